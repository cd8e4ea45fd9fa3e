"""`chtsl sweep` on a tiny grid (2 methods × 2 seeds × 4 steps): report = the runs' own metrics,
p-values = scipy's, restart skips / resumes cells, printed commands run as printed, bad input; plus
the alignment diagnostics every hybrid method logs and the run header's effective weight."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from scipy.stats import wilcoxon

from chtsl_infer.cli import main
from tests.conftest import corpus, lowrank_branch
from train.sweep import runner as sweep

METHODS = ("naive", "chtsl")
SEEDS = (0, 1)


def train_options(data: Path, steps: int = 4, every: int = 2) -> list[str]:
    """The forwarded train options: 2 blocks, seq 32, 4 steps, an update, OCR and eval at 2 and 4."""
    return ["--data", str(data), "--vocab-size", "512", "--num-layers", "2", "--seq-len", "32", "--batch-size", "8",
            "--micro-batch-size", "4", "--steps", str(steps), "--warmup", "1", "--update-interval", "2",
            "--restart-warmup", "1", "--eval-every", str(every), "--save-every", "2", "--ocr-every", str(every),
            "--eval-tokens", "2000"]


def sweep_argv(out: Path, data: Path, *extra: str, methods=METHODS, seeds=SEEDS) -> list[str]:
    return ["sweep", "--preset", "tiny", "--methods", ",".join(methods), "--s-total", "0.9",
            "--seeds", ",".join(map(str, seeds)), "--out", str(out), *train_options(data), *extra]


class Finished:
    """A child that has already exited with `code` (what `InProcess` returns)."""

    def __init__(self, code: int) -> None:
        self.code = code

    def poll(self) -> int:
        return self.code

    def wait(self, timeout: float | None = None) -> int:
        return self.code

    def send_signal(self, sig: int) -> None:
        pass


class InProcess:
    """A sweep launcher calling `chtsl <argv>` in this process before it returns (the subprocess costs
    seconds of imports per cell); records the commands it ran and the environment it was given."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.envs: list[dict[str, str]] = []

    def __call__(self, argv: list[str], log_path: Path, env: dict[str, str]) -> Finished:
        self.calls.append(list(argv))
        self.envs.append(env)
        try:
            main(argv)
        except SystemExit as e:
            return Finished(int(e.code or 0))
        return Finished(0)


def run_cli(argv: list[str], runner=None) -> int:
    """`main(argv)` with `run_sweep` using the launcher `runner`; the exit status."""
    original = sweep.run_sweep
    if runner is not None:
        sweep.run_sweep = lambda grid, out, jobs=1: original(grid, out, jobs=jobs, launcher=runner)
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sweep.run_sweep = original
    return 0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One thread, a BPE cache for the module, offline."""
    cache = tmp_path_factory.mktemp("chtsl-cache")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHTSL_CACHE_DIR", str(cache))
        mp.setenv("OMP_NUM_THREADS", "1")
        yield tmp_path_factory.mktemp("sweep")
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(env) -> Path:
    return corpus(env)


@pytest.fixture(scope="module")
def sweep_dir(env, data) -> Path:
    """The tiny grid run once by `chtsl sweep` (report written at the end)."""
    out = env / "grid"
    assert run_cli(sweep_argv(out, data), runner=InProcess()) == 0
    return out


def step_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()
            if line.strip() and '"step"' in line and '"event"' not in line]


def computed(x):
    """`x` (records) less wall-clock timings (`*_s` fields: the only ones two identical runs may differ in)."""
    if isinstance(x, list):
        return [computed(v) for v in x]
    if isinstance(x, dict):
        return {k: computed(v) for k, v in x.items() if not k.endswith("_s")}
    return x


def final_ppl(path: Path) -> float:
    recs = step_records(path)
    assert recs[-1]["step"] == 4
    return recs[-1]["val_ppl"]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow  # uses the module's sweep of `chtsl train` cells
def test_report_equals_the_runs_metrics(sweep_dir) -> None:
    report = json.loads((sweep_dir / "report.json").read_text())
    assert report["methods"] == ["naive", "chtsl"]  # registry order: baselines first
    assert report["counts"] == {"done": 4}
    ppl = {(m, k): final_ppl(sweep_dir / f"{m}-s0.9-seed{k}") for m in METHODS for k in SEEDS}
    for run in report["runs"]:
        assert run["status"] == "done" and run["val_ppl"] == ppl[(run["method"], run["seed"])]
    for g in report["groups"]:
        values = [ppl[(g["method"], k)] for k in SEEDS]
        assert g["val_ppl"] == {str(k): ppl[(g["method"], k)] for k in SEEDS}
        assert g["mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
        assert g["std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
    (pair,) = report["pairs"]
    assert (pair["a"], pair["b"], pair["n"]) == ("naive", "chtsl", 2)
    x, y = [ppl[("naive", k)] for k in SEEDS], [ppl[("chtsl", k)] for k in SEEDS]
    assert [d["diff"] for d in pair["differences"]] == [a - b for a, b in zip(x, y, strict=True)]
    expected = wilcoxon(x, y, alternative="two-sided", zero_method="wilcox")
    assert pair["p_value"] == expected.pvalue and pair["statistic"] == expected.statistic
    assert report["test"]["alternative"] == "two-sided" and report["test"]["zero_method"] == "wilcox"
    md = (sweep_dir / "report.md").read_text()
    assert f"{statistics.mean(x):.2f} ± {statistics.stdev(x):.2f}" in md and "zero_method `wilcox`" in md
    figures = {p.name for p in (sweep_dir / "figures").iterdir()}
    assert figures == {"val_ppl.png", "ocr_attn.png", "ocr_mlp.png", "cosine_attn.png", "cosine_mlp.png",
                       "align_attn.png", "align_mlp.png", "branches.png"}
    # The alignment value is logged on diagnostic steps for both hybrids; only chtsl optimises it.
    for m in METHODS:
        recs = step_records(sweep_dir / f"{m}-s0.9-seed0")
        diag = [r for r in recs if "ocr" in r]
        assert [r["step"] for r in diag] == [1, 2, 4]
        for r in diag:
            assert set(r["align"]) == set(r["ocr"]) and len(r["align"]) == 14
            assert r["align_value"] == pytest.approx(sum(r["align"].values()), rel=1e-12) and r["align_value"] > 0
        assert all((r["align_loss"] > 0) == (m == "chtsl") for r in recs)
    # The report alone (what `--report` prints) gives the same numbers.
    rerun = sweep.build_report(sweep.collect_runs(sweep_dir))
    assert rerun["groups"] == report["groups"] and rerun["pairs"] == report["pairs"]


@pytest.mark.slow  # a sweep interrupted and rerun
def test_restart_skips_finished_and_resumes_interrupted(sweep_dir, data, tmp_path, capsys) -> None:
    out = tmp_path / "grid"
    shutil.copytree(sweep_dir, out)
    before = snapshot(out / "naive-s0.9-seed0")
    runner = InProcess()
    assert run_cli(sweep_argv(out, data), runner=runner) == 0
    assert runner.calls == [] and snapshot(out / "naive-s0.9-seed0") == before

    # chtsl seed 1: interrupted after its step-2 checkpoint; naive seed 1: killed before any
    # checkpoint (a stale metrics line and nothing else).
    interrupted, fresh = out / "chtsl-s0.9-seed1", out / "naive-s0.9-seed1"
    reference = {p.name: step_records(p) for p in (interrupted, fresh)}
    grid = sweep.build_grid("tiny", ",".join(METHODS), "0.9", "0,1", train_options(data))
    shutil.rmtree(interrupted)
    shutil.rmtree(fresh)
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    assert run_cli([*grid.argv(sweep.Cell("chtsl", 0.9, 1), out), "--stop-at", "2", "--no-progress"]) == 0
    # killed while appending a line after its checkpoint: the torn line is dropped with one warning
    with (interrupted / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 5.1, "task_lo')
    assert sweep.inspect_run(sweep.Cell("chtsl", 0.9, 1), interrupted, warn=False).status == "interrupted"
    capsys.readouterr()

    runner = InProcess()
    assert run_cli(sweep_argv(out, data), runner=runner) == 0
    # one warning from the sweep, one from the resumed run dropping the line (in a real sweep, in its log)
    assert capsys.readouterr().err.count("dropped an incomplete last line") == 2
    assert len(runner.calls) == 2
    resumed = next(c for c in runner.calls if "chtsl" in c)
    assert resumed[resumed.index("--resume") + 1] == str(interrupted)
    assert "--resume" not in next(c for c in runner.calls if "naive" in c)
    for p in (interrupted, fresh):  # exact resume / clean restart: the same metrics as the first sweep
        got = step_records(p)
        assert [(r["step"], r["loss"], r.get("val_ppl")) for r in got] == [
            (r["step"], r["loss"], r.get("val_ppl")) for r in reference[p.name]]
    report = json.loads((out / "report.json").read_text())
    assert report["pairs"] == json.loads((sweep_dir / "report.json").read_text())["pairs"]


@pytest.mark.slow  # runs the printed train commands
def test_print_commands_run_as_printed(sweep_dir, data, tmp_path, capsys) -> None:
    out = tmp_path / "jobs"
    capsys.readouterr()
    assert run_cli([*sweep_argv(out, data), "--print-commands", "--json", str(tmp_path / "jobs.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("chtsl train ") for line in lines)
    assert json.loads((tmp_path / "jobs.json").read_text()) == {"commands": lines}
    assert not out.exists()  # printing writes nothing
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    seed0 = [line for line in lines if "--seed 0" in line]
    assert len(seed0) == 2
    for line in seed0:  # as a job array would: through a shell, exactly as printed
        r = subprocess.run(line, shell=True, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        cell = Path(shlex.split(line)[shlex.split(line).index("--out") + 1])
        assert computed(step_records(cell)) == computed(step_records(sweep_dir / cell.name))  # bit for bit
    assert run_cli(["sweep", "--report", str(out), "--no-figures", "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"done": 2} and report["pairs"][0]["n"] == 1
    assert json.loads((tmp_path / "report.json").read_text()) == report  # --json: the report it printed


@pytest.mark.slow  # uses the module's sweep of `chtsl train` cells
def test_diverged_runs_are_shown_and_counted(sweep_dir, data, tmp_path) -> None:
    out = tmp_path / "grid"
    shutil.copytree(sweep_dir, out)
    shutil.rmtree(out / "chtsl-s0.9-seed1")
    grid = sweep.build_grid("tiny", ",".join(METHODS), "0.9", "0,1", train_options(data))
    args = grid.train_args(sweep.Cell("chtsl", 0.9, 1), out)
    args.progress = False
    from train.trainer import train

    def poison(step: int, model: torch.nn.Module) -> None:
        if step == 3:  # after the step-2 checkpoint: step 4's loss is NaN
            with torch.no_grad():
                model.model.embed_tokens.weight.fill_(float("nan"))

    assert train(args, after_step=poison).stopped == "nan"
    run = sweep.inspect_run(sweep.Cell("chtsl", 0.9, 1), out / "chtsl-s0.9-seed1")
    assert run.status == "diverged" and run.step == 4
    runner = InProcess()
    assert run_cli(sweep_argv(out, data, "--no-figures"), runner=runner) == 0
    assert runner.calls == []  # a diverged cell is not rerun (it would diverge again)
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"done": 3, "diverged": 1}
    chtsl = next(g for g in report["groups"] if g["method"] == "chtsl")
    assert chtsl["n"] == 1 and chtsl["diverged"] == [1] and chtsl["std"] is None
    (pair,) = report["pairs"]
    assert pair["n"] == 1 and pair["excluded"] == [{"s_total": 0.9, "seed": 1, "a": "done", "b": "diverged"}]
    assert "diverged" in (out / "report.md").read_text()


def _clone(src: Path, dst: Path, **state) -> Path:
    """A copy of the cell `src` renamed to the cell `dst` (its args say so), with `state` fields changed."""
    shutil.copytree(src, dst)
    m = sweep.CELL_RE.match(dst.name)
    for name, changes in (("args.json", {"seed": int(m["seed"])}), ("state.json", state)):
        f = dst / "trainer_state" / name
        f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
    return dst


def _edit_last_record(cell: Path, **changes) -> None:
    lines = (cell / "metrics.jsonl").read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if '"val_ppl"' in line)
    lines[last] = json.dumps({**json.loads(lines[last]), **changes})
    (cell / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.slow  # uses the module's sweep of `chtsl train` cells
def test_report_counts_every_cell_in_its_true_state(sweep_dir, tmp_path, capsys) -> None:
    """Ten cells of sweep.json, one per state (and a torn last line): every one counted with its
    reason, nothing averaged but finite final perplexities, exit 1 naming the unreadable cell."""
    from chtsl_infer.utils import dir_lock

    out = tmp_path / "grid"
    shutil.copytree(sweep_dir, out)
    manifest = json.loads((out / "sweep.json").read_text())
    (out / "sweep.json").write_text(json.dumps({**manifest, "seeds": [0, 1, 2, 3, 4]}))
    (out / "report.json").unlink()
    done = out / "naive-s0.9-seed1"
    _edit_last_record(out / "chtsl-s0.9-seed1", val_ppl=float("nan"))  # written as NaN: diverged
    _clone(done, out / "naive-s0.9-seed2", step=2)  # a checkpoint before the last step
    _clone(done, out / "naive-s0.9-seed3", step=2)  # ... whose last run by the sweep failed
    (out / "logs" / "naive-s0.9-seed3.exit.json").write_text('{"exit": 1, "reason": "error: out of memory"}')
    # chtsl seed 2: no directory (missing); chtsl seed 3: a trainer holds its lock (running)
    _clone(out / "chtsl-s0.9-seed0", out / "chtsl-s0.9-seed4")
    with (out / "chtsl-s0.9-seed4" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # torn last line: dropped, the run is still done
    garbage = _clone(done, out / "naive-s0.9-seed4")
    text = (garbage / "metrics.jsonl").read_text().splitlines()
    (garbage / "metrics.jsonl").write_text("\n".join([text[0], "{oops", *text[1:]]) + "\n")
    (out / "chtsl-s0.9-seed3").mkdir()
    capsys.readouterr()
    with dir_lock(out / "chtsl-s0.9-seed3"):
        code = run_cli(["sweep", "--report", str(out), "--no-figures"])
    captured = capsys.readouterr()
    assert code == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 of 10 cells are unreadable" in errors[0] and "naive-s0.9-seed4" in errors[0]
    assert captured.err.count("dropped an incomplete last line") == 1
    report = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report"))
    state = {r["cell"]: (r["status"], r["reason"]) for r in report["runs"]}
    assert len(state) == 10
    assert report["counts"] == {"done": 4, "diverged": 1, "running": 1, "interrupted": 1, "failed": 1, "missing": 1,
                                "unreadable": 1}
    assert state["chtsl-s0.9-seed1"] == ("diverged", "final val_ppl is nan")
    assert state["naive-s0.9-seed2"] == ("interrupted", "checkpoint at step 2 of 4")
    assert state["naive-s0.9-seed3"] == ("failed", "exit 1: error: out of memory")
    assert state["chtsl-s0.9-seed2"] == ("missing", "not started")
    assert state["chtsl-s0.9-seed3"] == ("running", f"process {os.getpid()}")
    assert state["chtsl-s0.9-seed4"][0] == "done"
    assert state["naive-s0.9-seed4"][0] == "unreadable" and "metrics.jsonl:2 is not valid JSON" in state[
        "naive-s0.9-seed4"][1]
    chtsl = next(g for g in report["groups"] if g["method"] == "chtsl")
    assert chtsl["n"] == 2 and chtsl["val_ppl"] == {"0": final_ppl(out / "chtsl-s0.9-seed0"),
                                                    "4": final_ppl(out / "chtsl-s0.9-seed0")}
    assert chtsl["states"] == {"0": "done", "1": "diverged", "2": "missing", "3": "running", "4": "done"}
    md = (out / "report.md").read_text()
    assert "| naive-s0.9-seed3 | failed | 2/4 | exit 1: error: out of memory |" in md
    assert "(1 diverged, 1 running, 1 missing)" in md and "nan" not in md.split("## Runs without")[0].lower()
    # A string "NaN" is not what a trainer writes: unreadable, never a number.
    _edit_last_record(out / "chtsl-s0.9-seed4", val_ppl="NaN")
    assert sweep.inspect_run(sweep.Cell("chtsl", 0.9, 4), out / "chtsl-s0.9-seed4").status == "unreadable"


@pytest.mark.slow  # uses the module's sweep of `chtsl train` cells
def test_jobs_run_cells_at_once_with_their_share_of_threads(sweep_dir, data, tmp_path, monkeypatch) -> None:
    """--jobs 2 over 4 cells: two children at a time, never three, each with OMP_NUM_THREADS = 4 / 2;
    the children are stand-ins that take 1.5 s and then leave the cell the module's sweep trained."""
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    script = ("import json, os, shutil, sys, time\nsrc, dst, st = sys.argv[1:4]\nt0 = time.time()\ntime.sleep(1.5)\n"
              "shutil.copytree(src, dst, dirs_exist_ok=True)\nspan = [t0, time.time(), os.environ['OMP_NUM_THREADS']]\n"
              "json.dump(span, open(os.path.join(st, os.path.basename(dst)), 'w'))")

    def launcher(argv: list[str], log_path: Path, env: dict[str, str]) -> sweep.ChildProcess:
        dst = Path(argv[argv.index("--out") + 1])
        return sweep.ChildProcess([sys.executable, "-c", script, str(sweep_dir / dst.name), str(dst), str(stamps)],
                                  env=env, start_new_session=True)

    grid = sweep.build_grid("tiny", ",".join(METHODS), "0.9", "0,1", train_options(data))
    runs = sweep.run_sweep(grid, tmp_path / "grid", jobs=2, launcher=launcher)
    assert {r.status for r in runs.values()} == {"done"}
    spans = [json.loads(p.read_text()) for p in stamps.iterdir()]
    assert len(spans) == 4 and {t for _, _, t in spans} == {"2"}
    at_once = [sum(a <= t < b for a, b, _ in spans) for t, _, _ in spans]
    assert max(at_once) == 2


@pytest.mark.slow  # two `chtsl train` processes
def test_jobs_2_real_processes_match_the_serial_sweep(sweep_dir, data, tmp_path, monkeypatch) -> None:
    """`chtsl sweep --jobs 2` with real children, one thread each (OMP_NUM_THREADS=2 shared by 2 jobs):
    the same metrics, bit for bit, as the module's serial one-thread sweep."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "grid"
    assert run_cli(sweep_argv(out, data, "--jobs", "2", "--no-figures", seeds=(0,))) == 0
    for m in METHODS:
        cell = f"{m}-s0.9-seed0"
        assert computed(step_records(out / cell)) == computed(step_records(sweep_dir / cell))
        start = json.loads((out / cell / "metrics.jsonl").read_text().splitlines()[0])
        assert start["event"] == "start" and start["threads"] == 1
    assert json.loads((out / "report.json").read_text())["counts"] == {"done": 2}


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    kids = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat_file.parent.name))
    return kids


@pytest.mark.slow  # a real `chtsl sweep` killed while its child trains
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_stops_the_running_child_and_a_rerun_resumes(data, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "grid"
    steps = 200
    argv = ["sweep", "--preset", "tiny", "--methods", "chtsl", "--s-total", "0.9", "--seeds", "0", "--out", str(out),
            "--no-figures", *train_options(data, steps=steps, every=100)]
    proc = subprocess.Popen([sys.executable, "-m", "chtsl_infer.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    state = out / "chtsl-s0.9-seed0" / "trainer_state" / "state.json"
    try:
        deadline = time.monotonic() + 600
        while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        children = _children(proc.pid)
        assert proc.poll() is None and len(children) == 1, proc.communicate()[0] if proc.poll() is not None else ""
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "interrupted: the running cells were stopped" in output
    for pid in children:  # stopped and reaped, not orphaned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # the child got the same signal (not a kill): the trainer said which checkpoint it kept
    assert "interrupted by SIGTERM" in (out / "logs" / "chtsl-s0.9-seed0.log").read_text()
    cell = sweep.inspect_run(sweep.Cell("chtsl", 0.9, 0), out / "chtsl-s0.9-seed0")
    assert cell.status == "interrupted" and 0 < cell.step < steps
    runner = InProcess()
    assert run_cli(argv, runner=runner) == 0
    (call,) = runner.calls
    assert call[call.index("--resume") + 1] == str(out / "chtsl-s0.9-seed0")
    assert [r["step"] for r in step_records(out / "chtsl-s0.9-seed0")] == list(range(1, steps + 1))  # never twice
    assert json.loads((out / "report.json").read_text())["counts"] == {"done": 1}


def test_a_second_sweep_of_one_directory_fails_at_once(data, tmp_path, capsys) -> None:
    """While another process holds the sweep directory's lock, `chtsl sweep --out` on it fails with
    one line naming that process, before writing anything."""
    out = tmp_path / "grid"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom chtsl_infer.utils import dir_lock\n"
                               "with dir_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = _error(capsys, sweep_argv(out, data))
    finally:
        holder.kill()
        holder.wait()
    assert f"being written by process {holder.pid}" in err and not out.exists()


def test_statistics_on_a_larger_table() -> None:
    """Three methods × two s_total × four seeds of made-up perplexities, one diverged run and one
    zero difference: groups, exclusions and every alternative's p-value against scipy."""
    import random

    rng = random.Random(0)
    runs = []
    for s in (0.9, 0.8):
        for m, base in (("naive", 60.0), ("act", 55.0), ("chtsl", 54.0)):
            for k in range(4):
                ppl = base - 10 * (0.9 - s) + rng.uniform(-3, 3)
                runs.append(sweep.RunState(sweep.Cell(m, s, k), Path("."), "done", step=10, steps=10, val_ppl=ppl))
    by = {(r.cell.method, r.cell.s_total, r.cell.seed): r for r in runs}
    by[("act", 0.8, 3)].val_ppl = by[("chtsl", 0.8, 3)].val_ppl  # a zero difference
    by[("naive", 0.9, 2)].status, by[("naive", 0.9, 2)].val_ppl = "diverged", None
    for alternative in ("two-sided", "less", "greater"):
        report = sweep.build_report(runs, alternative)
        assert report["methods"] == ["naive", "act", "chtsl"]
        g = next(g for g in report["groups"] if (g["s_total"], g["method"]) == (0.9, "naive"))
        assert g["n"] == 3 and g["diverged"] == [2]
        assert g["mean"] == pytest.approx(statistics.mean(by[("naive", 0.9, k)].val_ppl for k in (0, 1, 3)))
        for p in report["pairs"]:
            keys = [(s, k) for s in (0.9, 0.8) for k in range(4)
                    if by[(p["a"], s, k)].status == by[(p["b"], s, k)].status == "done"]
            x = [by[(p["a"], s, k)].val_ppl for s, k in keys]
            y = [by[(p["b"], s, k)].val_ppl for s, k in keys]
            ref = wilcoxon(x, y, alternative=alternative, zero_method="wilcox")
            assert p["n"] == len(keys) and p["p_value"] == ref.pvalue and p["statistic"] == ref.statistic
            assert len(p["excluded"]) == (1 if p["a"] == "naive" else 0)
            assert p["ties"] == (1 if (p["a"], p["b"]) == ("act", "chtsl") else 0)


@pytest.mark.slow  # uses the module's sweep of `chtsl train` cells
def test_one_recipe_allows_each_methods_own_defaults(sweep_dir, tmp_path) -> None:
    args = json.loads((sweep_dir / "chtsl-s0.9-seed0" / "trainer_state" / "args.json").read_text())

    def run(method: str, **changes) -> sweep.RunState:
        return sweep.RunState(sweep.Cell(method, 0.9, 0), tmp_path / method, "done",
                              args={**args, "method": method, **changes})

    # The dense baseline's default lr and CoLA's default clipping differ from chtsl's: one recipe.
    sweep._check_one_recipe([run("chtsl"), run("dense", lr=1e-3), run("cola", grad_clip=0.5)])
    with pytest.raises(sweep.ChtslError, match="different recipes.*lr"):
        sweep._check_one_recipe([run("chtsl"), run("act", lr=1e-2)])
    with pytest.raises(sweep.ChtslError, match="different recipes.*seq_len"):
        sweep._check_one_recipe([run("chtsl"), run("naive", seq_len=64)])


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert run_cli(argv, runner=InProcess()) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.slow  # uses the module's sweep of `chtsl train` cells
def test_bad_input_one_line_exit_2_nothing_overwritten(sweep_dir, data, tmp_path, capsys) -> None:
    before = snapshot(sweep_dir)
    new = tmp_path / "new"
    cases = [
        (sweep_argv(new, data, methods=("naive", "bogus")), "unknown method 'bogus'"),
        ([*sweep_argv(new, data), "--preset", "nope"], "unknown preset"),
        (sweep_argv(new, data, methods=("",)), "--methods is empty"),
        ([*sweep_argv(new, data), "--seeds", ","], "--seeds is empty"),
        ([*sweep_argv(new, data), "--seeds", "0,0"], "repeats"),
        ([*sweep_argv(new, data), "--s-total", "0.75"], "s_total 0.75 is not in the table"),
        ([*sweep_argv(new, data), "--method", "act"], "cannot be forwarded"),
        ([*sweep_argv(new, data), "--no-such-option", "1"], "forwarded train option"),
        ([*sweep_argv(new, data), "--dtype", "fp16"], "unknown --dtype"),
        ([*sweep_argv(new, data), "--alternative", "both"], "unknown --alternative"),
        (["sweep", "--report", str(tmp_path / "missing")], "not a directory"),
        (["sweep", "--report", str(sweep_dir), "--out", str(new)], "takes no grid"),
    ]
    for argv, match in cases:
        err = _error(capsys, argv)
        assert match in err, (argv, err)
        assert not new.exists()
    # An existing sweep directory with another recipe: refused, for running and for printing.
    for extra in ([], ["--print-commands"]):
        err = _error(capsys, [*sweep_argv(sweep_dir, data), "--seq-len", "64", *extra])
        assert "trained with other arguments" in err and "seq_len" in err
    assert snapshot(sweep_dir) == before
    # --report: a directory with no runs; runs of two recipes.
    (tmp_path / "empty").mkdir()
    assert "holds no sweep runs" in _error(capsys, ["sweep", "--report", str(tmp_path / "empty")])
    mixed = tmp_path / "mixed"
    for name in ("naive-s0.9-seed0", "chtsl-s0.9-seed0"):
        shutil.copytree(sweep_dir / name, mixed / name)
    args_file = mixed / "chtsl-s0.9-seed0" / "trainer_state" / "args.json"
    args_file.write_text(json.dumps({**json.loads(args_file.read_text()), "warmup": 2}))
    err = _error(capsys, ["sweep", "--report", str(mixed)])
    assert "different recipes" in err and "warmup" in err
    assert not (mixed / "report.json").exists()


def test_alignment_value_of_every_hybrid_layer() -> None:
    """Diagnostics record L_align^(l) for every layer with both branches, optimised or not."""
    from chtsl_infer.model.layers import alignment_loss, record_branches
    from tests.conftest import tiny_model

    for method in ("naive", "act", "sltrain", "chtsl"):
        model = tiny_model(method)
        layers = model.chtsl_layers()
        inputs = {}
        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n, d=inputs: d.__setitem__(n, a[0]))
                 for n, m in layers.items()]
        ids = torch.randint(0, 512, (2, 16))
        with torch.no_grad(), record_branches(layers, align=set(model.align_layers()), diagnostics=True) as rec:
            model(input_ids=ids)
        for h in hooks:
            h.remove()
        assert set(rec.align) == set(layers) and bool(rec.align_terms) == (method == "chtsl")
        with torch.no_grad():
            for n, m in layers.items():
                ref = float(alignment_loss(m.sparse_branch(inputs[n]), lowrank_branch(m, inputs[n])))
                assert rec.align[n] == pytest.approx(ref, rel=1e-6)


def test_effective_alignment_weight_in_header(capsys) -> None:
    from chtsl_infer.model.presets import build_config
    from train.args import TrainArgs, resolve_args
    from train.trainer import effective_align_weights, print_header

    w = effective_align_weights(0.3, 4, 32, {"model.layers.0.self_attn.q_proj": 128,
                                             "model.layers.0.mlp.up_proj": 344})
    assert w == {"q_proj": 0.3 / math.sqrt(4 * 32 * 128), "up_proj": 0.3 / math.sqrt(4 * 32 * 344)}
    args = resolve_args(TrainArgs(micro_batch_size=4, batch_size=8, seq_len=32, progress=False))
    print_header(args, build_config("tiny"), 1000, {"x": None}, 0.3, w, resumed_at=None)
    err = capsys.readouterr().err
    assert "λ = 0.3" in err and f"{w['q_proj']:.3g} (q)" in err and f"{w['up_proj']:.3g} (up)" in err
    assert "low-rank init × 0.5" in err  # the tiny preset's scale for chtsl


def test_loss_figure_legend() -> None:
    """Total and task loss are two labelled, differently drawn lines; the alignment is in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.plot import loss_figure

    recs = [{"step": s, "loss": 3.0 - 0.1 * s, "task_loss": 2.9 - 0.1 * s, "align_loss": 0.3 / s} for s in (1, 2, 3)]
    recs[0]["align_value"] = 0.3
    fig = loss_figure(recs)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0].startswith("total loss") and labels[1] == "task loss"
    assert any(lab.startswith("alignment") and "optimised" in lab for lab in labels)
    total, task = fig.axes[0].get_lines()[:2]
    assert total.get_linestyle() != task.get_linestyle()
    plt.close(fig)


def test_cpu60m_follows_the_60m_layers() -> None:
    """cpu60m: the 60M block shapes and the paper's OWT 60M (s, r) — rank 16 at s_total 0.9 with
    d_c : d_l = 1 : 1 — and the 60M preset's effective alignment weight λ/√(B·N)."""
    from chtsl_infer.model import budget
    from chtsl_infer.model.presets import get_preset

    p, ref = get_preset("cpu60m"), get_preset("llama60m-c4")
    assert p.shapes() == ref.shapes() and p.steps == 1000
    assert p.table == get_preset("llama60m-owt").table
    s, r = p.split(0.9)
    assert (s, r) == (0.95, 16)
    for st in (0.9, 0.8, 0.7):
        s, r = p.split(st)
        d_c = 1 - s
        d_l = r * budget.rank_density(p.shapes())
        assert d_c == pytest.approx(d_l, rel=0.02) and 1 - d_c - d_l == pytest.approx(st, abs=0.002)
    weight = p.align_lambda / math.sqrt(p.micro_batch_size * p.seq_len)
    assert weight == pytest.approx(ref.align_lambda / math.sqrt(ref.micro_batch_size * ref.seq_len), rel=1e-3)


def test_report_summarises_the_branches_at_the_last_diagnostic_step() -> None:
    """OCR of q and k (mean over blocks) and λ·L_align / loss from each run's last record with OCR,
    averaged over the finished seeds; a run without diagnostics is left out of the mean, not zero."""
    def records(ocr_q: float, ocr_k: float, loss: float, task: float) -> list[dict]:
        layers = {f"model.layers.{i}.self_attn.{p}": v for i in range(2)
                  for p, v in (("q_proj", ocr_q + i * 0.1), ("k_proj", ocr_k), ("v_proj", 9.0))}
        return [{"step": 5, "loss": 9.0, "task_loss": 1.0, "ocr": {k: 0.0 for k in layers}},
                {"step": 10, "loss": loss, "task_loss": task, "ocr": layers},
                {"step": 11, "loss": 1.0, "task_loss": 1.0}]  # a later step without diagnostics

    runs = [sweep.RunState(sweep.Cell("chtsl", 0.9, 0), Path("."), "done", 10, 10, 50.0,
                           records=records(0.4, 0.5, 4.0, 3.0)),
            sweep.RunState(sweep.Cell("chtsl", 0.9, 1), Path("."), "done", 10, 10, 52.0,
                           records=records(0.2, 0.3, 2.0, 2.0)),
            sweep.RunState(sweep.Cell("chtsl", 0.9, 2), Path("."), "done", 10, 10, 51.0),
            sweep.RunState(sweep.Cell("act", 0.9, 0), Path("."), "running", 5, 10, records=records(0.9, 0.9, 1, 1))]
    assert sweep.branch_summary(runs[0]) == pytest.approx(
        {"step": 10, "ocr_q": 0.45, "ocr_k": 0.5, "align_share": 0.25})
    assert sweep.branch_summary(runs[2]) is None
    report = sweep.build_report(runs)
    chtsl = next(g for g in report["groups"] if g["method"] == "chtsl")
    assert chtsl["branches"] == pytest.approx({"ocr_q": 0.35, "ocr_k": 0.4, "align_share": 0.125, "n": 2})
    act = next(g for g in report["groups"] if g["method"] == "act")
    assert act["branches"]["n"] == 0  # an unfinished run is not summarised
    text = sweep.report_markdown(report)
    assert "| 0.9 | chtsl | 2 | 0.350 | 0.400 | 0.125 |" in text and "| 0.9 | act |" not in text.split(
        "### Branches")[1].split("## Paired")[0]
