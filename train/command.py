"""`chtsl train` and `chtsl plot` (Typer commands; heavy imports stay inside the functions)."""

from __future__ import annotations

import inspect
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from chtsl_infer.console import check_output_dir, check_output_file, console, json_on_stdout, write_json
from chtsl_infer.errors import ChtslError, Interrupted
from chtsl_infer.options import Checkpoint, Force, JsonOut
from train.args import TrainArgs, cli_parameters


def train_command(**options: Any) -> None:
    """Train a CHTsL (or baseline) LLaMA from scratch; `torchrun` runs it with DDP."""
    import os

    from train.trainer import print_result, train

    json_out, force = options.pop("json_out"), options.pop("force")
    check_output_file(json_out, force)  # before the run, not after it
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        with json_on_stdout(json_out):
            result = train(TrainArgs(**options))
            if main_rank:
                print_result(result)
    except Interrupted as e:  # `train` said which checkpoint is kept
        raise typer.Exit(e.exit_code) from None
    if main_rank:
        write_json(asdict(result), json_out, force)
    if result.stopped == "nan":
        raise typer.Exit(1)


# The options of `chtsl train` are the fields of TrainArgs (train/args.py), plus where the summary goes.
train_command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    *cli_parameters(),
    inspect.Parameter("json_out", inspect.Parameter.KEYWORD_ONLY, annotation=JsonOut, default=None),
    inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, annotation=Force, default=False),
])
train_command.__annotations__ = {p.name: p.annotation for p in train_command.__signature__.parameters.values()}


def plot_command(
    ckpt: Checkpoint,
    out: Annotated[Path | None, typer.Option(help="Output directory for the PNGs (default: CKPT/plots).")] = None,
    json_out: JsonOut = None,
    force: Force = False,
) -> None:
    """Loss / validation-perplexity curves and the OCR-over-steps grid (paper Figure 2) of a training
    checkpoint (its metrics.jsonl) as PNGs."""
    from train.plot import plot_run

    if not (ckpt / "metrics.jsonl").is_file():
        raise ChtslError(f"{ckpt} has no metrics.jsonl")
    target = check_output_dir(out or ckpt / "plots", "--out")
    check_output_file(json_out, force)
    with json_on_stdout(json_out):
        written = plot_run(ckpt / "metrics.jsonl", target)
        for p in written:
            console.print(f"wrote {p}")
    write_json({"checkpoint": str(ckpt), "out": str(target), "files": [str(p) for p in written]}, json_out, force)
