"""`chtsl train` and `chtsl plot` (Typer commands; heavy imports stay inside the functions)."""

from __future__ import annotations

import inspect
from dataclasses import asdict, fields
from typing import Any, get_type_hints

import typer

from chtsl_infer.console import check_output_dir, check_output_file, write_json
from chtsl_infer.errors import ChtslError
from train.args import TrainArgs


def _options(cls: type) -> list[inspect.Parameter]:
    """One Typer option per CLI field of the dataclass `cls` (default, help and flag from the field)."""
    hints = get_type_hints(cls)
    params = []
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        option = typer.Option(f.default, flag, help=f.metadata.get("help"))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=hints[f.name]))
    return params


def train_command(**options: Any) -> None:
    """Train a CHTsL (or baseline) LLaMA from scratch; `torchrun` runs it with DDP."""
    import os

    from train.trainer import print_result, train

    json_out, force = options.pop("json_out"), options.pop("force")
    check_output_file(json_out, force)  # before the run, not after it
    result = train(TrainArgs(**options))
    if int(os.environ.get("RANK", "0")) == 0:
        print_result(result)
        write_json(asdict(result), json_out, force)
    if result.stopped == "nan":
        raise typer.Exit(1)


# The options of `chtsl train` are the fields of TrainArgs (train/args.py), plus where the summary goes.
_JSON_OUT = inspect.Parameter("json_out", inspect.Parameter.KEYWORD_ONLY, annotation=str | None, default=typer.Option(
    None, "--json", help="Write the final summary as JSON here ('-': stdout)."))
_FORCE = inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
    False, "--force", help="Let --json replace an existing file."))
train_command.__signature__ = inspect.Signature([*_options(TrainArgs), _JSON_OUT, _FORCE])  # type: ignore[attr-defined]
train_command.__annotations__ = {p.name: p.annotation for p in train_command.__signature__.parameters.values()}


def plot_command(
    checkpoint: str = typer.Argument(..., help="Checkpoint directory with metrics.jsonl."),
    out: str | None = typer.Option(None, help="Output directory for the PNGs (default: CHECKPOINT/plots)."),
) -> None:
    """Loss / validation-perplexity curves and the OCR-over-steps grid (paper Figure 2) as PNGs."""
    from pathlib import Path

    from chtsl_infer.console import console
    from train.plot import plot_run

    path = Path(checkpoint)
    if not (path / "metrics.jsonl").is_file():
        raise ChtslError(f"{path} has no metrics.jsonl")
    target = check_output_dir(Path(out) if out else path / "plots", "--out")
    written = plot_run(path / "metrics.jsonl", target)
    for p in written:
        console.print(f"wrote {p}")
