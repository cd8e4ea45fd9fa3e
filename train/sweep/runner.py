"""`chtsl sweep`: a grid of `chtsl train` runs (methods × s_total × seeds), restartable, and its report.

A sweep directory `DIR` holds one training checkpoint per cell, `DIR/<method>-s<s_total>-seed<k>/`
(the trainer's own layout: model, `trainer_state/`, `metrics.jsonl`), the cells' console logs in
`DIR/logs/`, and, once every cell has finished, `report.md`, `report.json` and `figures/*.png`.

Each cell runs as its own `chtsl train` process (the same command `--print-commands` prints, plus
`--no-progress`), one after another. A cell's state is read from its directory only, so a
restarted sweep skips finished cells, resumes interrupted ones from their last checkpoint (the
trainer's exact resume) and starts the others; a directory filled by a cluster job array from the
printed commands is reported the same way.

Nothing here imports torch at module level: `chtsl --help` stays light.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chtsl_infer.errors import ChtslError

CELL_RE = re.compile(r"^(?P<method>[a-z0-9_]+)-s(?P<s_total>\d+(?:\.\d+)?)-seed(?P<seed>\d+)$")
# Train options a sweep sets per cell (or owns): they cannot be forwarded.
SWEEP_OWNED = {"method": "--methods", "s_total": "--s-total", "seed": "--seeds", "out": "--out",
               "resume": None, "stop_at": None, "json_out": None, "preset": "--preset"}
# Resolved arguments that do not change what a run computes (logging cadence, where it runs, paths):
# ignored when checking that the runs of a sweep share one recipe.
RUN_ONLY = ("out", "resume", "stop_at", "progress", "device", "save_every", "eval_every", "ocr_every")
CELL_KEYS = ("method", "s_total", "seed")
STATUSES = ("done", "diverged", "interrupted", "running", "left", "failed")
ALTERNATIVES = ("two-sided", "less", "greater")
ZERO_METHOD = "wilcox"  # zero differences are dropped before ranking (scipy's default)


# ----------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    method: str
    s_total: float
    seed: int

    @property
    def name(self) -> str:
        """The cell's directory name, `<method>-s<s_total>-seed<k>` (s_total as `%g`: 0.9, 0.85)."""
        return f"{self.method}-s{self.s_total:g}-seed{self.seed}"


def parse_list(text: str, kind: type, option: str) -> list:
    """Comma-separated values of `option` as `kind`, in order; ChtslError if empty, malformed or repeated."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ChtslError(f"{option} is empty: the grid has no cells")
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise ChtslError(f"{option} {text!r}: expected comma-separated {kind.__name__} values") from None
    dup = sorted({str(v) for v in values if values.count(v) > 1})
    if dup:
        raise ChtslError(f"{option} repeats {', '.join(dup)}")
    return values


def _train_click_command():
    """The click command behind `chtsl train` (to parse forwarded options exactly as `train` does)."""
    import typer

    from chtsl_infer.options import context_settings
    from train.command import train_command

    app = typer.Typer(add_completion=False)
    app.command(context_settings=context_settings("train"))(train_command)  # old spellings parse too
    return typer.main.get_command(app)


def parse_train_options(extra: list[str]) -> dict[str, Any]:
    """The `chtsl train` options in `extra` (forwarded to every cell) as {parameter: value}.

    Only options given on the command line are returned. ChtslError for unknown options, bad values,
    positional arguments and the options a sweep sets itself (method, s_total, seed, out, ...).
    """
    if "--help" in extra:
        raise ChtslError("--help is not forwarded; see `chtsl train --help` for the options")
    cmd = _train_click_command()
    try:
        ctx = cmd.make_context("chtsl train", list(extra), resilient_parsing=False)
    except Exception as e:  # typer vendors its own click: its exception classes are not click's
        if hasattr(e, "format_message"):
            raise ChtslError(f"forwarded train option: {e.format_message()}") from None
        raise
    given = {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "COMMANDLINE":
            given[name] = value
    for name in given:
        if name in SWEEP_OWNED:
            flag = "--" + ("json" if name == "json_out" else name.replace("_", "-"))
            instead = SWEEP_OWNED[name]
            raise ChtslError(f"{flag} cannot be forwarded to the runs of a sweep"
                            + (f"; use the sweep's {instead}" if instead else ""))
    return given


@dataclass
class Grid:
    """A sweep's grid and the train options applied to every cell."""

    preset: str
    methods: list[str]
    s_totals: list[float]
    seeds: list[int]
    extra: list[str] = field(default_factory=list)  # forwarded train options, verbatim
    options: dict[str, Any] = field(default_factory=dict)  # the same, parsed

    def cells(self) -> list[Cell]:
        """Seed-major order: every method and s_total of seed 0 first, so that paired comparisons
        over complete seeds exist as early as possible."""
        return [Cell(m, s, k) for k in self.seeds for s in self.s_totals for m in self.methods]

    def train_args(self, cell: Cell, out: Path):
        """The cell's `TrainArgs` (not yet resolved), as its `chtsl train` command builds them."""
        from train.args import TrainArgs

        known = set(TrainArgs.__dataclass_fields__)
        opts = {k: v for k, v in self.options.items() if k in known}
        return TrainArgs(**{**opts, "preset": self.preset, "method": cell.method, "s_total": cell.s_total,
                            "seed": cell.seed, "out": str(out / cell.name)})

    def argv(self, cell: Cell, out: Path) -> list[str]:
        """`chtsl train` arguments of a cell (without the program name)."""
        return ["train", "--preset", self.preset, "--method", cell.method, "--s-total", f"{cell.s_total:g}",
                "--seed", str(cell.seed), "--out", str(out / cell.name), *self.extra]


def build_grid(preset: str, methods: str, s_totals: str, seeds: str, extra: list[str]) -> Grid:
    """Parses and validates a grid: methods, preset, each (method, s_total) split, the train options.

    Every cell's arguments are resolved as the trainer will resolve them, so bad values fail here,
    before anything is written.
    """
    from chtsl_infer.model.presets import get_preset
    from train.args import build_model_config, resolve_args

    grid = Grid(preset=preset, methods=parse_list(methods, str, "--methods"),
                s_totals=parse_list(s_totals, float, "--s-total"), seeds=parse_list(seeds, int, "--seeds"),
                extra=list(extra), options=parse_train_options(extra))
    try:
        p = get_preset(preset)
    except ValueError as e:
        raise ChtslError(str(e)) from None
    valid_methods = _method_names()
    for m in grid.methods:
        if m not in valid_methods:
            raise ChtslError(f"unknown method {m!r}; valid: {', '.join(valid_methods)}")
    for s in grid.s_totals:
        try:
            p.split(s)  # the s_total is in the preset's table
        except ValueError as e:
            raise ChtslError(str(e)) from None
    if any(k < 0 for k in grid.seeds):
        raise ChtslError("--seeds must be non-negative integers")
    for cell in grid.cells():  # the model each cell will build (split, activation, alignment layers, ...)
        build_model_config(resolve_args(grid.train_args(cell, Path("."))))
    data = grid.options.get("data")
    if data and data not in ("builtin", "c4", "owt"):
        from train.data.sources import _expand_paths

        _expand_paths(data)  # ChtslError when the path names no text files
    return grid


def method_order(methods: set[str]) -> list[str]:
    """`methods` in the registry's order (dense, chts, cola, sltrain, naive, act, chtsl): baselines
    first, as the paper's tables; pairs (a, b) of the report take a from earlier in this order."""
    known = _method_names()
    return sorted(methods, key=lambda m: (known.index(m) if m in known else len(known), m))


def _method_names() -> list[str]:
    """The valid `--method` values (the layer's method table)."""
    from chtsl_infer.model.methods import METHODS

    return list(METHODS)


def command_line(argv: list[str]) -> str:
    """A shell line running `chtsl <argv>` (each argument quoted as needed)."""
    return "chtsl " + shlex.join(argv)


# ----------------------------------------------------------------------------- cell state


@dataclass
class RunState:
    """What a cell directory holds: its status, progress and final validation perplexity."""

    cell: Cell
    path: Path
    status: str  # one of STATUSES
    step: int = 0  # last checkpointed step (the diverging step for diverged runs)
    steps: int | None = None
    val_ppl: float | None = None  # final validation perplexity of a finished run
    args: dict[str, Any] = field(default_factory=dict)  # the run's resolved arguments (args.json)
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl step records
    note: str = ""


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of `path/metrics.jsonl` (a line still being written is skipped)."""
    f = path / "metrics.jsonl"
    out = []
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return out
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the trainer is appending this line right now
    return out


def inspect_run(cell: Cell, path: Path) -> RunState:
    """The state of a cell directory, from its checkpoint and metrics only.

    - `left`: no checkpoint yet (a run killed before its first save starts again from scratch);
    - `diverged`: the trainer logged a non-finite loss (`{"event": "diverged"}`) after the checkpoint;
    - `done`: the checkpoint is at the run's last step;
    - `interrupted`: a checkpoint before the last step (resumed exactly).
    """
    from train.checkpoint import STATE_DIR, resolve_checkpoint

    if path.exists() and not path.is_dir():
        raise ChtslError(f"{path} is not a directory")
    ckpt = resolve_checkpoint(path)
    state_file, args_file = ckpt / STATE_DIR / "state.json", ckpt / STATE_DIR / "args.json"
    records = read_records(path) if (path / "metrics.jsonl").is_file() else read_records(ckpt)
    if not (state_file.is_file() and args_file.is_file()):
        return RunState(cell, path, "left", records=[r for r in records if "step" in r])
    try:
        state, args = json.loads(state_file.read_text()), json.loads(args_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ChtslError(f"{ckpt} has an unreadable trainer state ({e})") from None
    step, steps = int(state.get("step", 0)), int(args.get("steps") or 0)
    diverged = [r for r in records if r.get("event") == "diverged" and r.get("step", 0) > step]
    steps_records = [r for r in records if "step" in r and "event" not in r]
    run = RunState(cell, path, "interrupted", step=step, steps=steps, args=args, records=steps_records)
    if diverged:
        run.status, run.step = "diverged", int(diverged[-1]["step"])
        run.note = f"non-finite loss at step {run.step}"
    elif step >= steps:
        final = [r for r in steps_records if r["step"] == steps and r.get("val_ppl") is not None]
        if final:
            run.status, run.val_ppl = "done", float(final[-1]["val_ppl"])
        else:
            run.note = "finished without a final validation perplexity in metrics.jsonl"
    return run


def recipe(args: dict[str, Any]) -> dict[str, Any]:
    """The arguments that define what a run computes, less the cell's own (method, s_total, seed)."""
    return {k: v for k, v in args.items() if k not in RUN_ONLY and k not in CELL_KEYS}


def _describe_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:3])


def check_existing(grid: Grid, out: Path) -> None:
    """ChtslError if a cell directory already in `out` was trained with other arguments than the grid
    now asks for (so a restart with a different recipe never touches it)."""
    from dataclasses import asdict as dc_asdict

    from train.args import resolve_args

    for cell in grid.cells():
        path = out / cell.name
        run = inspect_run(cell, path)
        if not run.args:
            continue
        expected = recipe(dc_asdict(resolve_args(grid.train_args(cell, out))))
        saved = recipe(run.args)
        cell_saved = {k: run.args.get(k) for k in CELL_KEYS}
        cell_expected = {"method": cell.method, "s_total": cell.s_total, "seed": cell.seed}
        if saved != expected or cell_saved != cell_expected:
            diff = _describe_diff({**saved, **cell_saved}, {**expected, **cell_expected})
            raise ChtslError(f"{path} was trained with other arguments ({diff}); "
                            f"choose another --out or rerun with the same options")


# ----------------------------------------------------------------------------- running


def _overview(grid: Grid, runs: dict[str, RunState], live_info: dict[str, str]):
    """The Rich overview: one row per cell (status, step, last val ppl) and the counts."""
    from rich.table import Table

    counts = {s: sum(r.status == s for r in runs.values()) for s in STATUSES}
    caption = " · ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s] or s in ("done", "running", "left"))
    t = Table(title="chtsl sweep", caption=caption, expand=False)
    for col, just in (("cell", "left"), ("status", "left"), ("step", "right"), ("val ppl", "right"),
                      ("note", "left")):
        t.add_column(col, justify=just)
    style = {"done": "green", "diverged": "red", "failed": "red", "running": "bold yellow", "interrupted": "yellow"}
    for cell in grid.cells():
        r = runs[cell.name]
        last_val = _last_val(r.records)
        steps = r.steps or "?"
        t.add_row(cell.name, f"[{style.get(r.status, 'dim')}]{r.status}[/]", f"{r.step}/{steps}",
                  f"{last_val:.2f}" if last_val is not None else "-", live_info.get(cell.name, r.note))
    return t


def _last_val(records: list[dict[str, Any]]) -> float | None:
    vals = [r["val_ppl"] for r in records if r.get("val_ppl") is not None]
    return float(vals[-1]) if vals else None


#: Runs one `chtsl train` command (argv without the program name), appending its output to the log;
#: calls `poll()` about every second while it runs; returns the exit status.
Runner = Callable[[list[str], Path, Callable[[], None]], int]


def subprocess_runner(argv: list[str], log_path: Path, poll: Callable[[], None]) -> int:
    """Runs `chtsl <argv>` as a child process (this Python, `-m chtsl_infer.cli`), output to the log."""
    with log_path.open("a") as log:
        log.write(f"$ {command_line(argv)}\n")
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "chtsl_infer.cli", *argv], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                poll()
        except BaseException:
            proc.terminate()  # Ctrl-C: the trainer keeps its last checkpoint; a rerun resumes from it
            proc.wait()
            raise
    return proc.returncode


def run_sweep(grid: Grid, out: Path, runner: Runner = subprocess_runner) -> dict[str, RunState]:
    """Runs every unfinished cell of `grid` in `out`, one `chtsl train` at a time (through `runner`).

    Finished and diverged cells are skipped, interrupted ones resume from their checkpoint. A cell
    whose run fails for another reason stops the sweep (ChtslError naming its log); the cells
    already finished stay. Returns the final state of every cell.
    """
    from rich.live import Live

    from chtsl_infer.console import err_console

    check_existing(grid, out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    _write_manifest(grid, out)
    runs = {c.name: inspect_run(c, out / c.name) for c in grid.cells()}
    info: dict[str, str] = {}
    with Live(_overview(grid, runs, info), console=err_console, refresh_per_second=2, transient=False) as live:
        for cell in grid.cells():
            run = runs[cell.name]
            if run.status in ("done", "diverged"):
                continue
            argv = grid.argv(cell, out)
            if run.status == "interrupted":
                argv += ["--resume", str(out / cell.name)]  # same recipe: checked above and by the trainer
            argv += ["--no-progress"]
            log_path = logs / f"{cell.name}.log"
            run.status, info[cell.name] = "running", f"log: {log_path}"
            live.update(_overview(grid, runs, info))
            t0 = time.perf_counter()

            def poll(cell: Cell = cell, run: RunState = run, t0: float = t0) -> None:
                records = [r for r in read_records(out / cell.name) if "step" in r and "event" not in r]
                if records:
                    run.records, run.step = records, records[-1]["step"]
                    tps = records[-1].get("tokens_per_s")
                    info[cell.name] = f"{tps:,.0f} tok/s · {time.perf_counter() - t0:.0f} s" if tps else ""
                live.update(_overview(grid, runs, info))

            rc = runner(argv, log_path, poll)
            new = inspect_run(cell, out / cell.name)
            runs[cell.name] = new
            info[cell.name] = f"{time.perf_counter() - t0:.0f} s"
            if rc != 0 and new.status != "diverged":
                new.status = "failed"
                live.update(_overview(grid, runs, info))
                raise ChtslError(f"cell {cell.name} failed (exit {rc}): {_last_line(log_path)} (log: {log_path})")
            live.update(_overview(grid, runs, info))
    return runs


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def _write_manifest(grid: Grid, out: Path) -> None:
    """`DIR/sweep.json`: the grid and forwarded options of the last `chtsl sweep` run here."""
    from chtsl_infer.console import write_json

    write_json({"preset": grid.preset, "methods": grid.methods, "s_totals": grid.s_totals, "seeds": grid.seeds,
                "train_options": grid.extra,
                "commands": [command_line(grid.argv(c, out)) for c in grid.cells()]},
               out / "sweep.json", force=True)  # the sweep's own file: a mismatched recipe is refused before this


# ----------------------------------------------------------------------------- report


def collect_runs(out: Path) -> list[RunState]:
    """Every cell directory of `out` (names `<method>-s<s_total>-seed<k>` with a trainer state or
    metrics), checked to share one recipe; ChtslError when there is none or recipes are mixed."""
    if not out.is_dir():
        raise ChtslError(f"{out} is not a directory")
    runs = []
    for path in sorted(out.iterdir()):
        m = CELL_RE.match(path.name)
        if not m or not path.is_dir():
            continue
        cell = Cell(m["method"], float(m["s_total"]), int(m["seed"]))
        run = inspect_run(cell, path)
        if run.status == "left" and not run.records:
            continue  # an empty directory: never started
        if run.args and (run.args.get("method"), run.args.get("s_total"), run.args.get("seed")) != (
                cell.method, cell.s_total, cell.seed):
            raise ChtslError(f"{path} holds a run of method {run.args.get('method')!r}, s_total "
                            f"{run.args.get('s_total')}, seed {run.args.get('seed')}: its name says otherwise")
        runs.append(run)
    if not runs:
        raise ChtslError(f"{out} holds no sweep runs (directories named <method>-s<s_total>-seed<k>)")
    _check_one_recipe(runs)
    return runs


def _check_one_recipe(runs: list[RunState]) -> None:
    """ChtslError naming two runs whose recipes differ. A field may differ only where each run holds
    its own method's default (e.g. the dense baseline's lr, CoLA's gradient clipping)."""
    from train.args import TrainArgs, resolve_args

    with_args = [r for r in runs if r.args]
    if not with_args:
        return
    known = set(TrainArgs.__dataclass_fields__)
    recipes = [recipe(r.args) for r in with_args]
    for key in sorted(set().union(*recipes)):
        values = [rc.get(key) for rc in recipes]
        if all(v == values[0] for v in values):
            continue
        defaults_ok = key in known
        if defaults_ok:
            for r, v in zip(with_args, values, strict=True):
                base = {k: v2 for k, v2 in r.args.items() if k in known}
                base.update({key: None, "resume": None, "stop_at": None})
                try:
                    default = getattr(resolve_args(TrainArgs(**base)), key)
                except (ChtslError, TypeError):
                    default = object()
                if default != v:
                    defaults_ok = False
                    break
        if not defaults_ok:
            i = next(i for i, v in enumerate(values) if v != values[0])
            raise ChtslError(f"runs of different recipes are mixed: {with_args[0].path.name} has {key} "
                            f"{values[0]!r}, {with_args[i].path.name} has {values[i]!r}")


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1; None for fewer than two values)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def build_report(runs: list[RunState], alternative: str = "two-sided") -> dict[str, Any]:
    """The report of a sweep directory (what report.json holds; report.md and the tables show it).

    - `groups`: per (s_total, method): final validation perplexity per seed, mean and sample std
      over the seeds that finished; diverged / unfinished runs counted, not averaged.
    - `pairs`: per pair of methods (a, b): the paired differences a − b over every (s_total, seed)
      both finished, and `scipy.stats.wilcoxon(a, b, alternative, zero_method="wilcox")`.
    """
    import warnings

    from scipy import __version__ as scipy_version
    from scipy.stats import wilcoxon

    if alternative not in ALTERNATIVES:
        raise ChtslError(f"unknown --alternative {alternative!r}; valid: {', '.join(ALTERNATIVES)}")
    methods = method_order({r.cell.method for r in runs})
    s_totals = sorted({r.cell.s_total for r in runs}, reverse=True)
    by_key = {(r.cell.s_total, r.cell.method, r.cell.seed): r for r in runs}
    groups = []
    for s in s_totals:
        for m in methods:
            cell_runs = sorted((r for r in runs if r.cell.s_total == s and r.cell.method == m),
                               key=lambda r: r.cell.seed)
            if not cell_runs:
                continue
            done = [r for r in cell_runs if r.status == "done"]
            mean, std = _stats([r.val_ppl for r in done])
            groups.append({
                "s_total": s, "method": m, "n": len(done), "mean": mean, "std": std,
                "val_ppl": {str(r.cell.seed): r.val_ppl for r in done},
                "diverged": [r.cell.seed for r in cell_runs if r.status == "diverged"],
                "unfinished": [r.cell.seed for r in cell_runs if r.status not in ("done", "diverged")],
            })
    pairs = []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            keys = sorted({(s, k) for (s, m, k) in by_key if m == a} & {(s, k) for (s, m, k) in by_key if m == b},
                          key=lambda t: (-t[0], t[1]))
            diffs, excluded = [], []
            for s, k in keys:
                ra, rb = by_key[(s, a, k)], by_key[(s, b, k)]
                if ra.status == "done" and rb.status == "done":
                    diffs.append({"s_total": s, "seed": k, "a": ra.val_ppl, "b": rb.val_ppl,
                                  "diff": ra.val_ppl - rb.val_ppl})
                else:
                    excluded.append({"s_total": s, "seed": k, "a": ra.status, "b": rb.status})
            entry: dict[str, Any] = {
                "a": a, "b": b, "n": len(diffs), "differences": diffs, "excluded": excluded,
                "a_lower": sum(d["diff"] < 0 for d in diffs), "b_lower": sum(d["diff"] > 0 for d in diffs),
                "ties": sum(d["diff"] == 0 for d in diffs),
                "mean_diff": _stats([d["diff"] for d in diffs])[0],
                "alternative": alternative, "zero_method": ZERO_METHOD, "statistic": None, "p_value": None,
                "note": "",
            }
            if diffs:
                x, y = [d["a"] for d in diffs], [d["b"] for d in diffs]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # n = 1 or all-zero differences: scipy warns, we note
                    res = wilcoxon(x, y, alternative=alternative, zero_method=ZERO_METHOD)
                entry["statistic"], entry["p_value"] = float(res.statistic), float(res.pvalue)
                nonzero = len(diffs) - entry["ties"]
                if nonzero == 0:
                    entry["note"] = "all differences are zero"
                elif nonzero < 6:
                    # With n non-zero pairs the exact test cannot go below 2/2^n (one-sided: 1/2^n).
                    floor = (2 if alternative == "two-sided" else 1) / 2 ** nonzero
                    entry["note"] = f"smallest possible p with {nonzero} pairs: {floor:.3g}"
            else:
                entry["note"] = "no pair where both runs finished"
            pairs.append(entry)
    recipe_args = recipe(next((r.args for r in runs if r.args), {}))
    counts = {s: sum(r.status == s for r in runs) for s in STATUSES}
    return {
        "format": "chtsl-sweep-report", "version": 1, "metric": "final validation perplexity",
        "recipe": recipe_args, "methods": methods, "s_totals": s_totals,
        "seeds": sorted({r.cell.seed for r in runs}), "counts": {k: v for k, v in counts.items() if v},
        "runs": [{"cell": r.cell.name, "method": r.cell.method, "s_total": r.cell.s_total, "seed": r.cell.seed,
                  "status": r.status, "step": r.step, "steps": r.steps, "val_ppl": r.val_ppl, "note": r.note}
                 for r in sorted(runs, key=lambda r: (-r.cell.s_total, methods.index(r.cell.method), r.cell.seed))],
        "groups": groups, "pairs": pairs,
        "test": {"function": "scipy.stats.wilcoxon(a, b)", "alternative": alternative, "zero_method": ZERO_METHOD,
                 "method": f"scipy {scipy_version}'s default ('auto'; in scipy 1.17: the exact null distribution "
                           "for up to 50 pairs without zero or tied differences, otherwise permutations for up "
                           "to 13 pairs or the normal approximation)",
                 "pairing": "the same (s_total, seed) of the two methods; pairs with a diverged or unfinished "
                            "run are excluded and listed"},
    }


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.4g}"


def group_cell(g: dict[str, Any]) -> str:
    """`mean ± std` of a group (with counts of diverged / unfinished runs)."""
    text = "-" if g["mean"] is None else _fmt(g["mean"]) + (f" ± {_fmt(g['std'])}" if g["std"] is not None else "")
    extra = []
    if g["diverged"]:
        extra.append(f"{len(g['diverged'])} diverged")
    if g["unfinished"]:
        extra.append(f"{len(g['unfinished'])} unfinished")
    return text + (f" ({', '.join(extra)})" if extra else "")


def report_markdown(report: dict[str, Any], figures: list[Path] | None = None) -> str:
    """report.md: the recipe, the mean ± std table, per-seed values, paired tests, run list, figures."""
    methods, seeds = report["methods"], report["seeds"]
    lines = ["# chtsl sweep report", "",
             f"Metric: {report['metric']} (lower is better), per (s_total, method): mean ± sample std (n − 1) "
             "over the seeds that finished. Diverged runs (non-finite loss) and unfinished runs are counted, "
             "never averaged.", "",
             "Counts: " + ", ".join(f"{v} {k}" for k, v in report["counts"].items()), "",
             "## Final validation perplexity", "",
             "| s_total | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for s in report["s_totals"]:
        row = [next((group_cell(g) for g in report["groups"] if g["s_total"] == s and g["method"] == m), "")
               for m in methods]
        lines.append(f"| {s:g} | " + " | ".join(row) + " |")
    lines += ["", "### Per seed", "", "| s_total | method | " + " | ".join(f"seed {k}" for k in seeds) + " |",
              "|---|---" + "|---" * len(seeds) + "|"]
    status = {(r["s_total"], r["method"], r["seed"]): r for r in report["runs"]}
    for g in report["groups"]:
        vals = []
        for k in seeds:
            r = status.get((g["s_total"], g["method"], k))
            vals.append("" if r is None else _fmt(r["val_ppl"]) if r["status"] == "done" else r["status"])
        lines.append(f"| {g['s_total']:g} | {g['method']} | " + " | ".join(vals) + " |")
    t = report["test"]
    lines += ["", "## Paired comparisons", "",
              f"Differences a − b of the final validation perplexity, paired by (s_total, seed) over all "
              f"s_total; Wilcoxon signed-rank test `{t['function']}`, alternative `{t['alternative']}`, "
              f"zero_method `{t['zero_method']}` (zero differences dropped before ranking), p-value method: "
              f"{t['method']}. Pairs where either run diverged or did not finish are excluded and counted.", "",
              "| a | b | pairs | mean a − b | a lower | b lower | W | p | excluded | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p in report["pairs"]:
        lines.append(f"| {p['a']} | {p['b']} | {p['n']} | {_fmt(p['mean_diff'])} | {p['a_lower']} | "
                     f"{p['b_lower']} | {_fmt(p['statistic'], 1)} | {_fmt_p(p['p_value'])} | "
                     f"{len(p['excluded'])} | {p['note']} |")
    lines += ["", "### Differences per pair", ""]
    for p in report["pairs"]:
        diffs = ", ".join(f"s{d['s_total']:g}/seed{d['seed']}: {d['diff']:+.2f}" for d in p["differences"]) or "-"
        lines.append(f"- {p['a']} − {p['b']}: {diffs}")
        for e in p["excluded"]:
            lines.append(f"  - excluded s{e['s_total']:g}/seed{e['seed']}: {p['a']} {e['a']}, {p['b']} {e['b']}")
    lines += ["", "## Recipe", "", "```json", json.dumps(report["recipe"], indent=2, default=str), "```"]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in figures]
    return "\n".join(lines) + "\n"


def print_report(report: dict[str, Any]) -> None:
    """The report as Rich tables on stdout."""
    from rich.table import Table

    from chtsl_infer.console import console

    methods, seeds = report["methods"], report["seeds"]
    t = Table(title="final validation perplexity: mean ± std over seeds",
              caption="counts: " + ", ".join(f"{v} {k}" for k, v in report["counts"].items()))
    t.add_column("s_total")
    for m in methods:
        t.add_column(m, justify="right")
    for s in report["s_totals"]:
        t.add_row(f"{s:g}", *[next((group_cell(g) for g in report["groups"] if g["s_total"] == s
                                    and g["method"] == m), "") for m in methods])
    console.print(t)
    status = {(r["s_total"], r["method"], r["seed"]): r for r in report["runs"]}
    t = Table(title="per seed")
    t.add_column("s_total")
    t.add_column("method")
    for k in seeds:
        t.add_column(f"seed {k}", justify="right")
    for g in report["groups"]:
        cells = []
        for k in seeds:
            r = status.get((g["s_total"], g["method"], k))
            cells.append("" if r is None else _fmt(r["val_ppl"]) if r["status"] == "done" else f"[red]{r['status']}[/]")
        t.add_row(f"{g['s_total']:g}", g["method"], *cells)
    console.print(t)
    test = report["test"]
    t = Table(title=f"paired Wilcoxon signed-rank over (s_total, seed): alternative {test['alternative']}, "
                    f"zero_method {test['zero_method']}")
    for col in ("a", "b", "pairs", "mean a − b", "a lower", "b lower", "p", "excluded", "note"):
        t.add_column(col, justify="left" if col in ("a", "b", "note") else "right")
    for p in report["pairs"]:
        t.add_row(p["a"], p["b"], str(p["n"]), _fmt(p["mean_diff"]), str(p["a_lower"]), str(p["b_lower"]),
                  _fmt_p(p["p_value"]), str(len(p["excluded"])), p["note"])
    console.print(t)


def write_report(out: Path, alternative: str = "two-sided", figures: bool = True) -> tuple[dict[str, Any], list[Path]]:
    """Collects the runs of `out`, writes report.json, report.md and figures/ (atomically), prints the tables."""
    from chtsl_infer.console import write_json

    runs = collect_runs(out)
    report = build_report(runs, alternative)
    written: list[Path] = []
    if figures:
        from train.sweep.plot import plot_sweep

        written = plot_sweep(runs, out / "figures")
    report["figures"] = [f"figures/{p.name}" for p in written]
    write_json(report, out / "report.json", force=True)  # the sweep's own report, rewritten on every --report
    md = out / "report.md"
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(report_markdown(report, written))
    tmp.replace(md)
    print_report(report)
    return report, written


__all__ = ["Cell", "Grid", "RunState", "build_grid", "build_report", "collect_runs", "command_line",
           "inspect_run", "parse_list", "parse_train_options", "run_sweep", "write_report"]
