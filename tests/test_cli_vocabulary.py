"""One CLI vocabulary (chtsl_infer/options.py): every command spells the checkpoint, the device, the
dtype, the JSON output, --force, the batch and the new tokens the same way, and each old spelling
parses exactly as its new one (nothing is run: the commands' contexts are only made)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from chtsl_infer.cli import app
from chtsl_infer.options import RENAMED

COMMANDS = ("info", "train", "plot", "export", "bench", "generate", "eval", "sweep")
READS_A_MODEL = {"plot": True, "export": True, "generate": True, "bench": False, "eval": False}  # CKPT required?
RUNS_A_MODEL = ("train", "bench", "generate", "eval")  # --device: where it runs, default auto
COMPUTE_DTYPE = ("bench", "generate", "eval")  # --dtype auto
# Minimal valid command lines (nothing is run: only parsed).
BASE = {"info": [], "train": [], "plot": ["ck"], "export": ["ck"], "bench": [], "generate": ["ck", "--prompt", "x"],
        "eval": ["ck"], "sweep": []}


def _commands() -> dict:  # name -> click command (typer's vendored click)
    group = typer.main.get_command(app)
    return {name: group.commands[name] for name in COMMANDS}


def _options(cmd) -> dict:
    """Every spelling a command lists in --help -> its parameter."""
    return {opt: p for p in cmd.params for opt in (*p.opts, *p.secondary_opts) if not getattr(p, "hidden", False)}


def _parse(name: str, argv: list[str]) -> dict:
    cmd = _commands()[name]
    with cmd.make_context(f"chtsl {name}", [*BASE[name], *argv], resilient_parsing=False) as ctx:
        return dict(ctx.params)


def test_every_command_is_registered() -> None:
    assert set(typer.main.get_command(app).commands) == set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_shared_spellings(name: str) -> None:
    cmd = _commands()[name]
    opts = _options(cmd)
    # --json PATH and --force on every command (each prints results)
    assert opts["--json"].name == "json_out" and opts["--json"].metavar == "PATH" and opts["--json"].default is None
    assert opts["--force"].name == "force" and opts["--force"].default is False
    # the checkpoint: one positional Path called ckpt, metavar CKPT; required unless the command runs without
    args = [p for p in cmd.params if p.param_type_name == "argument"]
    if name in READS_A_MODEL:
        assert [(a.name, a.metavar) for a in args] == [("ckpt", "CKPT")]
        assert _parse(name, [] if "ck" in BASE[name] else ["ck"])["ckpt"] == Path("ck")  # typed Path
        assert args[0].required is READS_A_MODEL[name]
    else:
        assert args == []
    if name in RUNS_A_MODEL:
        assert opts["--device"].default == "auto"
    else:
        assert "--device" not in opts  # export verifies on --verify-device; the others run no model
    if name in COMPUTE_DTYPE:
        assert opts["--dtype"].default == "auto"
    # one spelling for batch sizes and new tokens; no old spelling listed
    assert not {o for o in opts if "batch" in o} - {"--batch", "--micro-batch"}
    assert not {o for o in opts if "new-tokens" in o} - {"--new-tokens"}
    for old, new in RENAMED.get(name, {}).items():
        assert old not in opts and new in opts


@pytest.mark.parametrize(("name", "old", "new"),
                         [(n, old, new) for n, table in RENAMED.items() for old, new in table.items()])
def test_old_spellings_parse_as_the_new_ones(name: str, old: str, new: str) -> None:
    value = "cpu" if "device" in new else "out.json" if new == "--json" else "7"
    got_old, got_new = _parse(name, [old, value]), _parse(name, [new, value])
    assert got_old == got_new
    assert got_new != _parse(name, [])  # the value was taken
    assert got_old == _parse(name, [f"{old}={value}"])  # --old=value as well


def test_forwarded_old_spellings_reach_every_cell_of_a_sweep() -> None:
    from train.sweep.runner import parse_train_options

    assert parse_train_options(["--batch-size", "8", "--micro-batch-size", "4"]) == {"batch_size": 8,
                                                                                     "micro_batch_size": 4}
    assert parse_train_options(["--batch", "8", "--micro-batch", "4"]) == {"batch_size": 8, "micro_batch_size": 4}


def test_eval_without_ckpt_lists_tasks_or_names_ckpt(capsys: pytest.CaptureFixture[str]) -> None:
    from chtsl_infer.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--list-tasks"])
    assert e.value.code == 0 and "rte" in capsys.readouterr().out.split()
    with pytest.raises(SystemExit) as e:
        main(["eval", "--perplexity"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: missing CKPT") and len(err.splitlines()) == 1


def test_json_on_stdout_leaves_stdout_to_the_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`--json -`: what a command prints (Rich tables, plain prints such as streamed text) goes to
    stderr, and stdout holds the JSON alone; with a file or no --json, stdout is unchanged."""
    import json

    from chtsl_infer.console import console, json_on_stdout, write_json

    with json_on_stdout("-"):
        console.print("a table")
        print("streamed text")
    write_json({"tokens": 3}, "-")
    out, err = capsys.readouterr()
    assert json.loads(out) == {"tokens": 3} and "a table" in err and "streamed text" in err
    for path in (None, Path("r.json")):
        with json_on_stdout(path):
            console.print("a table")
        assert capsys.readouterr().out.strip() == "a table"
