"""The OpenMP wait policy of chtsl's commands: how long an idle thread spins before it sleeps.

A chtsl process has one OpenMP runtime. torch (its intra-op pool, MKL's GNU threading, oneDNN) and the
C kernels share torch's bundled `libgomp.so.1`: the kernels' library needs `libgomp.so.1` (its
SONAME) and the dynamic loader binds it to the copy torch already loaded — /proc/self/maps shows only
`torch/lib/libgomp.so.1`, and the kernels' parallel regions run on torch's worker threads (the thread
count does not grow when they first run). So there are not two pools in a process. What costs under
load is libgomp's default wait: after each parallel region and at each barrier, an idle thread spins
`GOMP_SPINCOUNT` iterations (300,000 by default: milliseconds) before it sleeps, and beside another
busy process those spins take the CPU time that the other process — and this process's own working
threads — need (issue 29: tiny training took 3–4× as long as with OMP_WAIT_POLICY=PASSIVE).

libgomp reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, when it is loaded (when torch is imported).
`configure()` sets them from the CLI's entry point, before torch; a user's own OMP_WAIT_POLICY or
GOMP_SPINCOUNT is left alone. Policies (`CHTSL_OMP_WAIT` picks one per run, `WAIT_POLICY` is the
default; benchmarks/load.py measures them):

    auto      `default` for a latency-bound command (`LATENCY_COMMANDS`: decoding's many short parallel
              regions a token, where each sleeping thread's wake-up is paid) started on an idle machine
              (`machine_idle`), `passive` otherwise
    default   libgomp's own: spin 300,000 iterations, then sleep (1,000 where threads outnumber CPUs)
    passive   OMP_WAIT_POLICY=PASSIVE: sleep at once
    active    OMP_WAIT_POLICY=ACTIVE: spin (practically) forever
    spin:N    GOMP_SPINCOUNT=N: spin N iterations (a `pause` each, ~20–50 ns), then sleep

Library users (`import chtsl_infer` in their own program): set `OMP_WAIT_POLICY=PASSIVE` in the
environment before Python starts, or call `chtsl_infer.omp.configure()` before the first `import torch`.
Nothing here imports torch.
"""

from __future__ import annotations

import os
import sys
import time

from chtsl_infer.errors import ChtslError
from chtsl_infer.utils import warn_once

# The default of chtsl's commands: sleeping threads leave a loaded machine's cores to the threads that work
# (tiny training 18× faster than with libgomp's spinning on a loaded 2-core EPYC), but on an idle machine each
# barrier then pays a wake-up (a llama60m decoding step of ~100 barriers: 0.73 -> 2.3 ms; int8 decoding
# 550 -> 145 tokens/s on an AMD Zen 4 VM). So decoding commands spin where nothing else runs; docs/performance.md §8.
WAIT_POLICY = "auto"
LATENCY_COMMANDS = ("generate", "bench")  # `auto` spins for these on an idle machine
USER_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # a user's own setting wins


def machine_idle(samples: int = 10, interval_s: float = 0.002) -> bool:
    """Whether no other thread wants a CPU this process would use: /proc/stat's `procs_running` (the
    runnable threads, this one among them) sampled `samples` times, at most 0.5 others on average beyond
    the CPUs left over by this process's OpenMP threads (OMP_NUM_THREADS, else every CPU). False where
    /proc/stat cannot be read (not Linux): sleeping is the safe choice."""
    cpus = os.cpu_count() or 1
    threads = os.environ.get("OMP_NUM_THREADS", "").strip()
    spare = max(0, cpus - (int(threads) if threads.isdigit() and int(threads) > 0 else cpus))
    others = []
    try:
        for i in range(samples):
            with open("/proc/stat", encoding="ascii") as stat:
                running = next(int(line.split()[1]) for line in stat if line.startswith("procs_running "))
            others.append(running - 1)
            if i + 1 < samples:
                time.sleep(interval_s)
    except (OSError, StopIteration, ValueError, IndexError):
        return False
    return sum(others) / len(others) <= spare + 0.5


def resolve(policy: str, command: str | None = None) -> str:
    """The policy `policy` stands for when `command` (the chtsl subcommand, None: unknown) starts now:
    `auto` becomes `default` or `passive` (see the module docstring); any other name is itself."""
    name = policy.strip().lower()
    if name != "auto":
        return name
    return "default" if command in LATENCY_COMMANDS and machine_idle() else "passive"


def environment(policy: str, command: str | None = None) -> dict[str, str]:
    """The environment variables a policy sets for `command` (`default`: none; `auto`: see `resolve`).
    ChtslError for an unknown policy."""
    name = resolve(policy, command)
    if name == "default":
        return {}
    if name in ("passive", "active"):
        return {"OMP_WAIT_POLICY": name.upper()}
    if name.startswith("spin:") and name[5:].isdigit():
        return {"GOMP_SPINCOUNT": name[5:]}
    raise ChtslError(f"unknown OpenMP wait policy {policy!r} (CHTSL_OMP_WAIT); valid: auto, default, passive, "
                     "active, spin:N")


def configure(policy: str | None = None, command: str | None = None) -> str | None:
    """Sets the wait policy for this process's OpenMP runtime (and its children): `policy`, else
    `$CHTSL_OMP_WAIT`, else `WAIT_POLICY`, resolved for `command` (`resolve`). Returns the policy set
    (`auto` resolved), or None where the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT (left alone). Call
    it before torch is imported: later, libgomp has read its settings already (one warning line then)."""
    chosen = policy or os.environ.get("CHTSL_OMP_WAIT") or WAIT_POLICY
    environment(chosen)  # ChtslError on a bad name, whatever else holds (`auto` without a command: no sampling)
    if any(name in os.environ for name in USER_VARIABLES):
        return None
    chosen = resolve(chosen, command)
    if "torch" in sys.modules:
        warn_once(f"the OpenMP wait policy {chosen!r} was set after torch was imported and has no effect")
    os.environ.update(environment(chosen))
    return chosen
