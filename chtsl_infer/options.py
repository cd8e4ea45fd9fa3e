"""The `chtsl` command-line vocabulary, declared once: the checkpoint argument and the options every
command spells the same way (Typer `Annotated` aliases), and the old spellings that still parse.

A command declares `ckpt: Checkpoint` or `device: Device = "auto"`: Typer takes the flag, metavar
and help from the alias, the default from the signature. The rules the aliases stand for, checked
on every command by tests/test_cli_vocabulary.py:

- CKPT, a positional `Path`, is required by every command that reads a model; only `bench` (without
  it: a random-weight preset model) and `eval` (`--list-tasks` reads none) take `OptionalCheckpoint`;
- `--device` is where the model runs, default `auto` (CUDA when available); `export`, which runs
  nothing but its verification, calls that device `--verify-device`;
- `--dtype` of an inference command defaults to `auto` (fp32 on CPU, bf16 on CUDA; an int8 export
  keeps its int8 weights on CPU), and `int8` runs int8 weights with fp32 activations (a float model
  quantized in memory); `export`'s is the dtype its packed file stores (`PackedDtype`), `train`'s
  the autocast of `TrainArgs.dtype`;
- `--int8-activations` (inference commands) adds int8 activations to int8 weights in the sparse
  products, the low-rank factors and an int8 lm_head (`runtime.fused.use_int8_activations`); it
  needs `--dtype int8` (or an int8 export under `auto`) on the CPU sparse backend;
- `--json PATH` writes what the command prints, as JSON (`-`: stdout, which then carries the JSON
  only), and `--force` lets it replace an existing file (and `export` its output directory);
- `--batch` is sequences per batch, `--new-tokens` the tokens generated per sequence.

`chtsl train`'s own options are the fields of `train.args.TrainArgs` (flags included); it takes
`Device`, `JsonOut` and `Force` from here. Validation stays in the commands (ChtslError naming the
flag), not in these declarations. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

Checkpoint = Annotated[Path, typer.Argument(
    metavar="CKPT", show_default=False,
    help="Model directory: a training checkpoint (`chtsl train --out`) or an export (`chtsl export --out`).")]
OptionalCheckpoint = Annotated[Path | None, typer.Argument(
    metavar="CKPT", show_default=False,
    help="Model directory: a training checkpoint or an export (see the command's description when omitted).")]

Device = Annotated[str, typer.Option(
    "--device", help="Where the model runs: auto, cpu, cuda or cuda:N (auto: cuda when available).")]
Dtype = Annotated[str, typer.Option(
    "--dtype", help="auto, fp32, bf16, fp16 or int8 (int8 weights, fp32 activations; CPU) (auto: fp32 on CPU, "
    "bf16 on CUDA; an int8 export keeps int8 on CPU).")]
Int8Activations = Annotated[bool, typer.Option(
    "--int8-activations", help="With int8 weights on the CPU sparse backend: round the inputs of the int8 "
    "products (sparse, low-rank, lm_head) to int8 too (per token and 256 features, as llama.cpp's Q8_0 does per "
    "32): faster decoding, not bit-equal.")]
PackedDtype = Annotated[str, typer.Option(
    "--dtype", help="Value dtype of the packed safetensors: fp32, bf16, fp16 or int8 (per-row scales).")]

JsonOut = Annotated[Path | None, typer.Option(
    "--json", metavar="PATH", help="Also write the results as JSON here ('-': stdout, the JSON only).")]
Force = Annotated[bool, typer.Option(
    "--force", help="Let --json (and export's --out) replace an existing file (directory).")]

Batch = Annotated[int, typer.Option("--batch", help="Sequences per forward pass.")]
NewTokens = Annotated[int, typer.Option("--new-tokens", help="Tokens generated per sequence.")]

# Old spelling -> new, per command. Click's token normaliser reads the old flag as the new one: it
# parses as before, `--help` lists the new one only, and a bad value is reported under the new name.
RENAMED: dict[str, dict[str, str]] = {
    "train": {"--batch-size": "--batch", "--micro-batch-size": "--micro-batch"},
    "eval": {"--batch-size": "--batch", "--output": "--json"},
    "generate": {"--max-new-tokens": "--new-tokens"},
    "export": {"--device": "--verify-device"},
}


def context_settings(command: str, **settings: Any) -> dict[str, Any]:
    """Click context settings of `chtsl COMMAND`: `settings` plus the reader of its old spellings."""
    renamed = {old[2:]: new[2:] for old, new in RENAMED.get(command, {}).items()}
    if renamed:
        # Called with an option name without its dashes (and with single letters of short options).
        settings["token_normalize_func"] = lambda name: renamed.get(name, name)
    return settings
