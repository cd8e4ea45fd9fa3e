"""`chtsl sweep`: a grid of `chtsl train` runs (methods × s_total × seeds), restartable, and its report.

A sweep directory `DIR` holds one training checkpoint per cell, `DIR/<method>-s<s_total>-seed<k>/`
(the trainer's own layout: model, `trainer_state/`, `metrics.jsonl`), the cells' console logs and
last exit status in `DIR/logs/`, the grid in `DIR/sweep.json` and, once every cell has finished,
`report.md`, `report.json` and `figures/*.png`.

Each cell runs as its own `chtsl train` process (the same command `--print-commands` prints, plus
`--no-progress`), `--jobs N` of them at once, each with its share of the CPU threads, in its own
process group: stopping the sweep (Ctrl-C, SIGTERM) stops them too. A cell's state is read from its
directory only, so a restarted sweep skips finished cells, resumes interrupted ones from their last
checkpoint (the trainer's exact resume) and starts the others; a directory filled by a cluster job
array from the printed commands is reported the same way. One sweep at a time writes a directory
(`chtsl_infer.utils.dir_lock`).

Nothing here imports torch at module level: `chtsl --help` stays light.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from chtsl_infer.errors import ChtslError

CELL_RE = re.compile(r"^(?P<method>[a-z0-9_]+)-s(?P<s_total>\d+(?:\.\d+)?)-seed(?P<seed>\d+)$")
# Train options a sweep sets per cell (or owns): they cannot be forwarded.
SWEEP_OWNED = {"method": "--methods", "s_total": "--s-total", "seed": "--seeds", "out": "--out",
               "resume": None, "stop_at": None, "preset": "--preset"}
# Resolved arguments that do not change what a run computes (logging cadence, where it runs, paths):
# ignored when checking that the runs of a sweep share one recipe.
RUN_ONLY = ("out", "resume", "stop_at", "progress", "device", "save_every", "eval_every", "ocr_every")
CELL_KEYS = ("method", "s_total", "seed")
# A cell's state (`inspect_run`): finished (done, diverged), in progress elsewhere (running), to be
# (re)started by the sweep (interrupted, failed, missing), or damaged files (unreadable).
STATUSES = ("done", "diverged", "running", "interrupted", "failed", "missing", "unreadable")
FINISHED = ("done", "diverged")
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


def parse_train_options(extra: list[str]) -> dict[str, Any]:
    """The `chtsl train` options in `extra` (forwarded to every cell) as {parameter: value}.

    Only options given on the command line are returned (parsed as `chtsl train` parses them,
    `train.args.parse_cli`). ChtslError for unknown options, bad values, positional arguments and
    the options a sweep sets itself (method, s_total, seed, out, ...).
    """
    from train.args import parse_cli

    if "--help" in extra:
        raise ChtslError("--help is not forwarded; see `chtsl train --help` for the options")
    try:
        given = parse_cli(extra)
    except ChtslError as e:
        raise ChtslError(f"forwarded {e}") from None
    for name in given:
        if name in SWEEP_OWNED:
            flag = "--" + name.replace("_", "-")
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
    if data:
        from train.data.sources import check_corpus
        from train.data.streaming import HUB_SOURCES

        if data not in HUB_SOURCES:
            check_corpus(data)  # a local corpus every cell can train on: readable, with text, not empty
    return grid


def check_jobs(jobs: int, cells: int) -> None:
    """ChtslError unless 1 <= `jobs` <= `cells` (more jobs than cells could only sit idle)."""
    if jobs < 1:
        raise ChtslError(f"--jobs must be >= 1, got {jobs}")
    if jobs > cells:
        raise ChtslError(f"--jobs {jobs} is more than the grid's {cells} cell{'s' if cells != 1 else ''}")


def thread_budget() -> int:
    """The CPU threads a sweep shares among its jobs: `OMP_NUM_THREADS` when set (the user's cap),
    else the CPUs this process may run on."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        pass
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_job(jobs: int) -> int:
    """Threads of each of `jobs` concurrent cells: the budget divided evenly, at least 1."""
    return max(1, thread_budget() // jobs)


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
    """What a cell directory holds: its status, progress, final validation perplexity and why."""

    cell: Cell
    path: Path
    status: str  # one of STATUSES
    step: int = 0  # last checkpointed step (the diverging step for diverged runs)
    steps: int | None = None
    val_ppl: float | None = None  # final validation perplexity of a finished run (finite)
    args: dict[str, Any] = field(default_factory=dict)  # the run's resolved arguments (args.json)
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl step records
    reason: str = ""  # why the cell is in its state (shown in the tables and report.json)

    @property
    def has_checkpoint(self) -> bool:
        """Whether a rerun continues from a checkpoint (`--resume`) rather than from step 0."""
        return bool(self.args)


def read_records(path: Path, warn: bool = True) -> list[dict[str, Any]]:
    """The records of `path/metrics.jsonl` ([] without one). An incomplete last line (a run killed
    while appending it) is dropped with one warning (`warn`); ChtslError for other damage."""
    from train.checkpoint import read_metrics_log

    f = path / "metrics.jsonl"
    return read_metrics_log(f, warn=warn) if f.is_file() else []


def step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step records (an integer `step` and no `event`) of a metrics log."""
    return [r for r in records if isinstance(r.get("step"), int) and "event" not in r]


def _number(value: Any) -> float | None:
    """`value` as a float if it is a JSON number (not a bool, not a string such as "NaN"), else None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def inspect_run(cell: Cell, path: Path, warn: bool = True) -> RunState:
    """The state of a cell directory, from its checkpoint, metrics and writer lock only; never raises
    for damaged files (they make the cell `unreadable`, with the reason).

    - `missing`: no directory, or an empty one (never started);
    - `running`: a live process holds the directory's writer lock (`chtsl train` running into it);
    - `interrupted`: a checkpoint before the run's last step (resumed exactly), or metrics but no
      checkpoint yet (a run killed before its first save starts again from step 0);
    - `diverged`: the trainer logged a non-finite loss after the checkpoint (`{"event": "diverged"}`),
      or the final validation perplexity is not finite;
    - `done`: the checkpoint is at the run's last step, with a finite final `val_ppl`;
    - `unreadable`: files a run cannot have written (a bad trainer state, a metrics line that is
      not JSON other than a torn last one, a finished run without a final val_ppl, a run of another
      cell). `failed` is set by the caller from the sweep's exit record (`apply_exit`).
    """
    from chtsl_infer.utils import lock_holder
    from train.checkpoint import STATE_DIR, load_state, resolve_checkpoint

    if path.exists() and not path.is_dir():
        return RunState(cell, path, "unreadable", reason=f"{path} is not a directory")
    holder = lock_holder(path)  # a run that has just started may not have written anything yet
    if holder is None and (not path.is_dir() or not any(path.iterdir())):
        return RunState(cell, path, "missing", reason="not started")
    run = RunState(cell, path, "interrupted")
    ckpt = resolve_checkpoint(path)
    try:
        records = read_records(path if (path / "metrics.jsonl").is_file() else ckpt, warn=warn and holder is None)
    except ChtslError as e:  # a line in the middle that is not JSON: not what a trainer writes
        if holder is None:
            return RunState(cell, path, "unreadable", reason=str(e))
        records = []  # the writer is rewriting it (a resume drops the lines after its checkpoint)
    run.records = step_records(records)
    if run.records:
        run.step = run.records[-1]["step"]
    if holder is not None:
        run.status, run.reason = "running", f"process {holder}"
        return run
    if not ((ckpt / STATE_DIR).exists() or (ckpt / "config.json").exists()):
        run.step = 0
        run.reason = "no checkpoint yet: starts again from step 0"
        return run
    try:
        state, args = load_state(path)
        steps = args.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ChtslError(f"{ckpt / STATE_DIR / 'args.json'}: steps must be a positive integer, got {steps!r}")
        if (args.get("method"), args.get("s_total"), args.get("seed")) != (cell.method, cell.s_total, cell.seed):
            raise ChtslError(f"{path} holds a run of method {args.get('method')!r}, s_total {args.get('s_total')}, "
                             f"seed {args.get('seed')}: its name says otherwise")
    except ChtslError as e:
        return RunState(cell, path, "unreadable", records=run.records, reason=str(e))
    run.step, run.steps, run.args = state["step"], steps, args
    diverged = [r for r in records if r.get("event") == "diverged" and isinstance(r.get("step"), int)
                and r["step"] > run.step]
    if diverged:
        run.status, run.step = "diverged", diverged[-1]["step"]
        run.reason = f"non-finite loss at step {run.step}"
    elif run.step < steps:
        run.reason = f"checkpoint at step {run.step} of {steps}"
    else:
        final = [r for r in run.records if r["step"] == steps and "val_ppl" in r]
        value = _number(final[-1]["val_ppl"]) if final else None
        if not final:
            run.status, run.reason = "unreadable", f"finished at step {steps} without a final val_ppl in metrics.jsonl"
        elif value is None:
            run.status, run.reason = "unreadable", f"final val_ppl {final[-1]['val_ppl']!r} is not a number"
        elif not math.isfinite(value):
            run.status, run.reason = "diverged", f"final val_ppl is {value}"
        else:
            run.status, run.val_ppl, run.reason = "done", value, ""
    return run


def exit_record_path(out: Path, cell: Cell) -> Path:
    """`DIR/logs/<cell>.exit.json`: the exit status and last log line of the cell's last run by `chtsl sweep`."""
    return out / "logs" / f"{cell.name}.exit.json"


def apply_exit(run: RunState, out: Path) -> RunState:
    """`run`, marked `failed` (with the reason) when it is not finished and its last run by the sweep
    exited non-zero: a rerun retries it."""
    f = exit_record_path(out, run.cell)
    if run.status in FINISHED or run.status in ("running", "unreadable") or not f.is_file():
        return run
    try:
        record = json.loads(f.read_text(encoding="utf-8"))
        code, reason = int(record["exit"]), str(record.get("reason", ""))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
        return run  # a damaged exit record says nothing about the run itself
    if code != 0:
        run.status, run.reason = "failed", f"exit {code}: {reason}"
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
        run = inspect_run(cell, path, warn=False)
        if not run.args:
            continue
        expected = recipe(dc_asdict(resolve_args(grid.train_args(cell, out))))
        saved = recipe(run.args)
        if saved != expected:
            raise ChtslError(f"{path} was trained with other arguments ({_describe_diff(saved, expected)}); "
                            f"choose another --out or rerun with the same options")


# ----------------------------------------------------------------------------- running


def _overview(grid: Grid, runs: dict[str, RunState], live_info: dict[str, str], title: str = "chtsl sweep"):
    """The Rich overview: one row per cell (status, step, last val ppl, why) and the counts."""
    from rich.table import Table

    counts = {s: sum(r.status == s for r in runs.values()) for s in STATUSES}
    caption = " · ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s] or s in ("done", "running"))
    t = Table(title=title, caption=caption, expand=False)
    for col, just in (("cell", "left"), ("status", "left"), ("step", "right"), ("val ppl", "right"),
                      ("note", "left")):
        t.add_column(col, justify=just)
    style = {"done": "green", "diverged": "red", "failed": "red", "unreadable": "red", "running": "bold yellow",
             "interrupted": "yellow"}
    for cell in grid.cells():
        r = runs[cell.name]
        last_val = _last_val(r.records)
        steps = r.steps or "?"
        t.add_row(cell.name, f"[{style.get(r.status, 'dim')}]{r.status}[/]", f"{r.step}/{steps}",
                  f"{last_val:.2f}" if last_val is not None else "-", live_info.get(cell.name, r.reason))
    return t


def _last_val(records: list[dict[str, Any]]) -> float | None:
    vals = [_number(r.get("val_ppl")) for r in records]
    vals = [v for v in vals if v is not None]
    return vals[-1] if vals else None


class Child(Protocol):
    """A started cell run (a `subprocess.Popen` or a test's stand-in)."""

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...


#: Starts one `chtsl train` command (argv without the program name) with environment `env`, its
#: output appended to the log; returns at once with the running child.
Launcher = Callable[[list[str], Path, dict[str, str]], Child]


class ChildProcess(subprocess.Popen):
    """A cell's `chtsl train` in its own process group: a signal reaches the trainer and whatever it
    started (a kernel compiler) together, and only through the sweep."""

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:  # exited in between
                pass


def spawn(argv: list[str], log_path: Path, env: dict[str, str]) -> ChildProcess:
    """Starts `chtsl <argv>` as a child process (this Python, `-m chtsl_infer.cli`), output to the log."""
    with log_path.open("a") as log:
        log.write(f"$ {command_line(argv)}\n")
        log.flush()
        return ChildProcess([sys.executable, "-m", "chtsl_infer.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)


STOP_GRACE_S = 30.0  # how long a stopped child may take to exit before it is killed


def _stop_children(children: list[Child], sig: int) -> None:
    """Forwards `sig` to every running child and waits for them (SIGKILL after `STOP_GRACE_S`): the
    trainer's checkpoints are written atomically, so each keeps its last complete one."""
    for child in children:
        child.send_signal(sig)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()


POLL_S = 1.0  # how often running cells are looked at


def run_sweep(grid: Grid, out: Path, jobs: int = 1, launcher: Launcher = spawn) -> dict[str, RunState]:
    """Runs every unfinished cell of `grid` in `out`, `jobs` `chtsl train` processes at a time (through
    `launcher`), each with `threads_per_job(jobs)` threads, while holding the directory's lock.

    Finished and diverged cells are skipped, interrupted and failed ones resume from their
    checkpoint, the others start from step 0; each runs at most once per call. A cell whose run
    fails (non-zero exit, not diverged) stops new cells from starting; the running ones finish,
    then ChtslError names the failed cell and its log. Unreadable cells are skipped and named at
    the end. SIGINT and SIGTERM (`errors.Interrupted`, through `utils.interruptible`) are forwarded
    to the running cells, which are waited for before the exception propagates. Returns the final state of every cell.
    """
    from rich.live import Live

    from chtsl_infer.console import err_console
    from chtsl_infer.errors import Interrupted
    from chtsl_infer.utils import atomic_write_text, dir_lock, interruptible

    cells = grid.cells()
    check_jobs(jobs, len(cells))
    with dir_lock(out):
        check_existing(grid, out)
        out.mkdir(parents=True, exist_ok=True)
        logs = out / "logs"
        logs.mkdir(exist_ok=True)
        _write_manifest(grid, out)
        runs = {c.name: apply_exit(inspect_run(c, out / c.name), out) for c in cells}
        queue = [c for c in cells if runs[c.name].status in ("interrupted", "failed", "missing")]
        threads = threads_per_job(jobs)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        info: dict[str, str] = {}
        active: dict[str, tuple[Cell, Child, float]] = {}
        failures: list[str] = []
        title = f"chtsl sweep · {jobs} job{'s' if jobs > 1 else ''} × {threads} thread{'s' if threads > 1 else ''}"

        def launch(cell: Cell) -> None:
            run = runs[cell.name]
            argv = grid.argv(cell, out)
            if run.has_checkpoint:
                argv += ["--resume", str(out / cell.name)]  # same recipe: checked above and by the trainer
            argv += ["--no-progress"]
            log_path = logs / f"{cell.name}.log"
            exit_record_path(out, cell).unlink(missing_ok=True)
            active[cell.name] = (cell, launcher(argv, log_path, env), time.perf_counter())
            run.status, info[cell.name] = "running", f"log: {log_path}"

        def finish(cell: Cell, rc: int, t0: float) -> None:
            log_path = logs / f"{cell.name}.log"
            reason = _last_line(log_path) if rc != 0 else ""
            atomic_write_text(exit_record_path(out, cell), json.dumps({"exit": rc, "reason": reason}) + "\n")
            new = apply_exit(inspect_run(cell, out / cell.name), out)
            info[cell.name] = f"{time.perf_counter() - t0:.0f} s"
            if new.status not in FINISHED and new.status != "failed":
                new.status, new.reason = "failed", f"exit {rc} at step {new.step}: {reason or 'stopped early'}"
            runs[cell.name] = new
            if new.status == "failed":
                failures.append(f"cell {cell.name} failed ({new.reason}; log: {log_path})")

        def progress(cell: Cell, t0: float) -> None:
            try:
                records = step_records(read_records(out / cell.name, warn=False))
            except ChtslError:
                return  # being rewritten by a resume; the next poll reads it
            if records:
                run = runs[cell.name]
                run.records, run.step = records, records[-1]["step"]
                tps = records[-1].get("tokens_per_s")
                info[cell.name] = f"{tps:,.0f} tok/s · {time.perf_counter() - t0:.0f} s" if tps else ""

        with interruptible(), Live(_overview(grid, runs, info, title), console=err_console, refresh_per_second=2,
                                   transient=False) as live:
            try:
                while active or (queue and not failures):
                    while queue and not failures and len(active) < jobs:
                        launch(queue.pop(0))
                    live.update(_overview(grid, runs, info, title))
                    for name, (cell, child, t0) in list(active.items()):
                        rc = child.poll()
                        if rc is None:
                            progress(cell, t0)
                        else:
                            del active[name]
                            finish(cell, rc, t0)
                    live.update(_overview(grid, runs, info, title))
                    if active:
                        time.sleep(POLL_S)
            except BaseException as e:  # Ctrl-C, SIGTERM (`Interrupted`), or an error of the sweep itself
                _stop_children([child for _, child, _ in active.values()],
                               e.signum if isinstance(e, Interrupted) else signal.SIGINT)
                raise
    if failures:
        raise ChtslError("; ".join(failures))
    unreadable = [r for r in runs.values() if r.status == "unreadable"]
    if unreadable:
        raise ChtslError(f"{len(unreadable)} cell(s) cannot be run or reported: "
                         + "; ".join(f"{r.cell.name}: {r.reason}" for r in unreadable))
    return runs


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def _write_manifest(grid: Grid, out: Path) -> None:
    """`DIR/sweep.json`: the grid and forwarded options of the last `chtsl sweep` run here."""
    from chtsl_infer.console import write_json

    write_json({"preset": grid.preset, "methods": grid.methods, "s_totals": grid.s_totals, "seeds": grid.seeds,
                "train_options": grid.extra,
                "commands": [command_line(grid.argv(c, out)) for c in grid.cells()]},
               out / "sweep.json", force=True)  # the sweep's own file: a mismatched recipe is refused before this


# ----------------------------------------------------------------------------- report


def manifest_cells(out: Path) -> list[Cell]:
    """The cells of the grid `DIR/sweep.json` names ([] without one); ChtslError when it is damaged."""
    f = out / "sweep.json"
    if not f.is_file():
        return []
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
        grid = Grid(preset=str(m["preset"]), methods=[str(x) for x in m["methods"]],
                    s_totals=[float(x) for x in m["s_totals"]], seeds=[int(x) for x in m["seeds"]])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        raise ChtslError(f"{f} is unreadable ({type(e).__name__}: {e})") from None
    return grid.cells()


def collect_runs(out: Path) -> list[RunState]:
    """Every cell of `out`: those of its `sweep.json` grid (a cell without a directory is `missing`)
    and every directory named `<method>-s<s_total>-seed<k>`, each with its true state; the runs with a
    trainer state must share one recipe. ChtslError when there is no cell at all or recipes are mixed."""
    if not out.is_dir():
        raise ChtslError(f"{out} is not a directory")
    cells = {c.name: c for c in manifest_cells(out)}
    for path in sorted(out.iterdir()):
        m = CELL_RE.match(path.name)
        if m and path.is_dir() and path.name not in cells:
            cells[path.name] = Cell(m["method"], float(m["s_total"]), int(m["seed"]))
    if not cells:
        raise ChtslError(f"{out} holds no sweep runs (no sweep.json, no directories named <method>-s<s_total>-seed<k>)")
    runs = [apply_exit(inspect_run(c, out / c.name), out) for c in cells.values()]
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


def branch_summary(run: RunState) -> dict[str, float | None] | None:
    """A run at its last diagnostic step (the records with per-layer `ocr`; None without one): the
    OCR of the q and k projections, each the mean over the blocks (the paper's Fig. 2 quantities),
    and the alignment term's share of the optimised loss, (loss − task_loss) / loss = λ·L_align /
    loss (0 where nothing aligns)."""
    last = next((r for r in reversed(run.records) if isinstance(r.get("ocr"), dict) and r["ocr"]), None)
    if last is None:
        return None

    def ocr(projection: str) -> float | None:
        values = [v for k, v in last["ocr"].items() if k.endswith(f".{projection}") and _finite(v)]
        return sum(values) / len(values) if values else None

    loss, task = last.get("loss"), last.get("task_loss")
    share = (loss - task) / loss if _finite(loss) and _finite(task) and loss != 0 else None
    return {"step": last.get("step"), "ocr_q": ocr("q_proj"), "ocr_k": ocr("k_proj"), "align_share": share}


def _finite(x: Any) -> bool:
    value = _number(x)
    return value is not None and math.isfinite(value)


def build_report(runs: list[RunState], alternative: str = "two-sided") -> dict[str, Any]:
    """The report of a sweep directory (what report.json holds; report.md and the tables show it).

    - `groups`: per (s_total, method): final validation perplexity per seed, mean and sample std
      over the seeds that finished (`done`: a finite value); every other state counted by seed
      (`diverged`, `unfinished`, `states`), never averaged; `branches`: the mean over those seeds of
      `branch_summary` (OCR of q and k, the alignment term's share of the loss).
    - `runs`: every cell with its state and the reason; `counts`: cells per state.
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
            summaries = [b for b in map(branch_summary, done) if b is not None]
            branches = {key: _stats([b[key] for b in summaries if b[key] is not None])[0]
                        for key in ("ocr_q", "ocr_k", "align_share")}
            groups.append({
                "s_total": s, "method": m, "n": len(done), "mean": mean, "std": std,
                "val_ppl": {str(r.cell.seed): r.val_ppl for r in done},
                "diverged": [r.cell.seed for r in cell_runs if r.status == "diverged"],
                "unfinished": [r.cell.seed for r in cell_runs if r.status not in FINISHED],
                "states": {str(r.cell.seed): r.status for r in cell_runs},
                "branches": {**branches, "n": len(summaries)},
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
                  "status": r.status, "step": r.step, "steps": r.steps, "val_ppl": r.val_ppl, "reason": r.reason}
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
    """`mean ± std` of a group, with the count of its runs in every other state (e.g. `1 diverged`)."""
    text = "-" if g["mean"] is None else _fmt(g["mean"]) + (f" ± {_fmt(g['std'])}" if g["std"] is not None else "")
    states = list(g["states"].values())
    extra = [f"{states.count(s)} {s}" for s in STATUSES if s != "done" and s in states]
    return text + (f" ({', '.join(extra)})" if extra else "")


def report_markdown(report: dict[str, Any], figures: list[Path] | None = None) -> str:
    """report.md: the recipe, the mean ± std table, per-seed values, paired tests, run list, figures."""
    methods, seeds = report["methods"], report["seeds"]
    lines = ["# chtsl sweep report", "",
             f"Metric: {report['metric']} (lower is better), per (s_total, method): mean ± sample std (n − 1) "
             "over the seeds that finished. Runs in any other state (diverged: a non-finite loss or "
             "perplexity; running, interrupted, failed, missing, unreadable) are counted, never averaged.", "",
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
    with_branches = [g for g in report["groups"] if g.get("branches", {}).get("n")]
    if with_branches:
        lines += ["", "### Branches at the last diagnostic step", "",
                  "Means over the finished seeds: OCR of the q and k projections (each the mean over the blocks; "
                  "the paper's Fig. 2) and the alignment term's share of the optimised loss, λ·L_align / loss "
                  "(0 where nothing aligns).", "",
                  "| s_total | method | seeds | OCR q | OCR k | alignment share of loss |", "|---|---|---|---|---|---|"]
        for g in with_branches:
            b = g["branches"]
            share = "-" if b["align_share"] is None else f"{b['align_share']:.3g}"
            lines.append(f"| {g['s_total']:g} | {g['method']} | {b['n']} | {_fmt(b['ocr_q'], 3)} | "
                         f"{_fmt(b['ocr_k'], 3)} | {share} |")
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
    unfinished = [r for r in report["runs"] if r["status"] != "done"]
    if unfinished:
        lines += ["", "## Runs without a final perplexity", "", "| cell | state | step | reason |", "|---|---|---|---|"]
        lines += [f"| {r['cell']} | {r['status']} | {r['step']}/{r['steps'] or '?'} | {r['reason']} |"
                  for r in unfinished]
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
    from chtsl_infer.utils import atomic_write_text

    runs = collect_runs(out)
    report = build_report(runs, alternative)
    written: list[Path] = []
    if figures:
        from train.sweep.plot import plot_sweep

        written = plot_sweep([r for r in runs if r.status != "unreadable"], report["methods"], out / "figures")
    report["figures"] = [f"figures/{p.name}" for p in written]
    write_json(report, out / "report.json", force=True)  # the sweep's own report, rewritten on every --report
    atomic_write_text(out / "report.md", report_markdown(report, written))
    print_report(report)
    return report, written


def unreadable_error(report: dict[str, Any]) -> str | None:
    """One line naming the report's unreadable cells and why, or None when there are none."""
    bad = [r for r in report["runs"] if r["status"] == "unreadable"]
    if not bad:
        return None
    return (f"{len(bad)} of {len(report['runs'])} cells are unreadable (reported as such, without a value): "
            + "; ".join(f"{r['cell']}: {r['reason']}" for r in bad))


__all__ = ["Cell", "Grid", "RunState", "build_grid", "build_report", "check_jobs", "collect_runs", "command_line",
           "inspect_run", "parse_list", "parse_train_options", "run_sweep", "spawn", "write_report"]
