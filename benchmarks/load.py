"""Fair under load: tiny training and 60M decoding alone and beside CPU-burning processes, for each
OpenMP wait policy, against the ideal slowdown (the CPU share the job gets).

    python benchmarks/load.py                                   # policies auto,passive,default; 1 burner
    python benchmarks/load.py --policies default,passive --burn 2 --json load.json
    python benchmarks/load.py --train-steps 2 --decode-preset tiny --new-tokens 4   # a quick check

Jobs (each a `chtsl` command in a fresh process; the policy reaches it as CHTSL_OMP_WAIT, see
chtsl_infer/omp.py, with OMP_WAIT_POLICY and GOMP_SPINCOUNT removed from its environment):

    train   chtsl train --preset tiny --steps 60: the sum of its steps' times (metrics.jsonl), so
            start-up, evaluation and checkpoints are not counted
    decode  chtsl bench --mode decode --preset llama60m-c4 --batch 1: the sparse model's decoding
            time (prompt 128, 64 new tokens; median of bench's repetitions)

Each job runs once to warm the caches (tokenizer, compiled and tuned kernels), then, per policy, alone
and beside `--burn` processes that each spin a busy loop on one core. Columns: `alone` and `beside`
(seconds), `slowdown` = beside / alone, `ideal` = the slowdown of a job that gets exactly its CPU
share — T threads beside B busy processes on C cores get C·T/(T+B) of their T cores: max(1, (T+B)/C)
—, and `× ideal` = slowdown / ideal (1.0: fair; issue 29's target for tiny training beside one
burner on 2 cores: slowdown ≤ 2.3). Measure on an idle machine (`cat /proc/loadavg` below 0.3):
the burners must be the only load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, Python puts benchmarks/ first on sys.path, where sibling scripts would shadow packages.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

BURNER = "while True:\n    pass\n"


def ideal_slowdown(threads: int, burners: int, cores: int) -> float:
    """The slowdown of a `threads`-thread job beside `burners` single-core busy processes on `cores` cores
    when the scheduler shares the cores fairly among the threads (and the job scales with its share)."""
    return max(1.0, (min(threads, cores) + burners) / cores)


def job_env(policy: str, threads: int | None) -> dict[str, str]:
    """The environment of a job under `policy`: CHTSL_OMP_WAIT set, the user's own OpenMP wait variables
    removed (they would override it), OMP_NUM_THREADS where `threads` is given."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["CHTSL_OMP_WAIT"] = policy
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_train(args: argparse.Namespace, policy: str, steps: int, work: Path) -> float:
    """Seconds of `chtsl train --preset tiny`'s steps (their step_time_s, summed)."""
    out = Path(tempfile.mkdtemp(dir=work))
    argv = [sys.executable, "-m", "chtsl_infer.cli", "train", "--preset", "tiny", "--steps", str(steps),
            "--out", str(out / "run"), "--no-progress", "--eval-tokens", "2000"]  # evaluation is not timed
    if steps < 30:  # the preset's 30 warm-up steps need a run at least that long
        argv += ["--warmup", "1"]
    proc = subprocess.run(argv, env=job_env(policy, args.threads), capture_output=True, text=True,
                          timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"train failed ({policy}):\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line]
    times = [r["step_time_s"] for r in records if "step_time_s" in r]
    if len(times) != steps:
        raise SystemExit(f"train ({policy}): {len(times)} step times for {steps} steps")
    return sum(times)


def run_decode(args: argparse.Namespace, policy: str, new_tokens: int, work: Path) -> float:
    """Seconds the sparse model takes to decode `new_tokens` tokens (`chtsl bench --mode decode`);
    `work` is unused (the signature of `run_train`)."""
    argv = [sys.executable, "-m", "chtsl_infer.cli", "bench", "--mode", "decode", "--preset", args.decode_preset,
            "--batch", "1", "--prompt-len", str(args.prompt_len), "--new-tokens", str(new_tokens),
            "--steps", str(args.decode_steps), "--device", "cpu", "--json", "-"]
    proc = subprocess.run(argv, env=job_env(policy, args.threads), capture_output=True, text=True,
                          timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"decode failed ({policy}):\n{proc.stderr[-2000:]}")
    rows = json.loads(proc.stdout)["results"]
    sparse = next(r for r in rows if r["method"] != "dense")
    return statistics.median(sparse["decode_s"])


def beside_burners(n: int, fn, *fn_args):
    """fn(*fn_args) while `n` busy-loop processes run (started 0.5 s before, killed after)."""
    burners = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(n)]
    try:
        time.sleep(0.5)
        return fn(*fn_args)
    finally:
        for p in burners:
            p.kill()
        for p in burners:
            p.wait()


def measure(args: argparse.Namespace, work: Path) -> list[dict]:
    jobs = {"train": (run_train, args.train_steps), "decode": (run_decode, args.new_tokens)}
    chosen = [j for j in args.jobs.split(",") if j]
    for name in chosen:  # warm-up: tokenizer, compiled and tuned kernels in the cache
        fn, size = jobs[name]
        fn(args, args.policies.split(",")[0], min(size, 2), work)
    cores = os.cpu_count() or 1
    threads = min(args.threads or cores, cores)
    ideal = ideal_slowdown(threads, args.burn, cores)
    rows = []
    for name in chosen:
        fn, size = jobs[name]
        for policy in args.policies.split(","):
            alone = fn(args, policy, size, work)
            beside = beside_burners(args.burn, fn, args, policy, size, work)
            slowdown = beside / alone
            rows.append({"job": name, "policy": policy, "alone_s": alone, "beside_s": beside, "slowdown": slowdown,
                         "ideal": ideal, "vs_ideal": slowdown / ideal, "threads": threads, "burners": args.burn,
                         "cores": cores})
    return rows


def table(rows: list[dict]) -> Table:
    first = rows[0]
    t = Table(title=f"beside {first['burners']} busy process(es) · {first['threads']} threads · "
                    f"{first['cores']} cores")
    for col in ("job", "policy", "alone s", "beside s", "slowdown", "ideal", "× ideal"):
        t.add_column(col, justify="left" if col in ("job", "policy") else "right")
    for r in rows:
        t.add_row(r["job"], r["policy"], f"{r['alone_s']:.3f}", f"{r['beside_s']:.3f}", f"{r['slowdown']:.2f}",
                  f"{r['ideal']:.2f}", f"{r['vs_ideal']:.2f}")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="auto,passive,default",
                    help="OpenMP wait policies (chtsl_infer/omp.py), comma-separated")
    ap.add_argument("--burn", type=int, default=1, help="busy-loop processes beside the job (one core each)")
    ap.add_argument("--jobs", default="train,decode", help="train, decode or both")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--decode-preset", default="llama60m-c4")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=3, help="bench's repetitions (median)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the jobs (default: all cores)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per job")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    from chtsl_infer.omp import environment

    for policy in args.policies.split(","):
        environment(policy)  # ChtslError on a bad name, before any job runs
    if args.burn < 0 or any(j not in ("train", "decode") for j in args.jobs.split(",") if j):
        ap.error("--burn must be >= 0 and --jobs a list of train, decode")
    with tempfile.TemporaryDirectory(prefix="chtsl-load-") as tmp:
        rows = measure(args, Path(tmp))
    Console().print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
