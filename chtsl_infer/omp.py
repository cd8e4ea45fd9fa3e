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

from chtsl_infer.errors import ChtslError
from chtsl_infer.utils import warn_once

# The default of chtsl's commands: sleeping threads leave a loaded machine's cores to the threads that work
# (tiny training 18× faster than with libgomp's spinning on a loaded 2-core EPYC) at ~15 µs per barrier on an
# idle one (a llama60m decoding step of ~100 barriers: 0.73 -> 2.3 ms); docs/performance.md §8.
WAIT_POLICY = "passive"
USER_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # a user's own setting wins


def environment(policy: str) -> dict[str, str]:
    """The environment variables a policy sets (`default`: none). ChtslError for an unknown policy."""
    name = policy.strip().lower()
    if name == "default":
        return {}
    if name in ("passive", "active"):
        return {"OMP_WAIT_POLICY": name.upper()}
    if name.startswith("spin:") and name[5:].isdigit():
        return {"GOMP_SPINCOUNT": name[5:]}
    raise ChtslError(f"unknown OpenMP wait policy {policy!r} (CHTSL_OMP_WAIT); valid: default, passive, active, "
                     "spin:N")


def configure(policy: str | None = None) -> str | None:
    """Sets the wait policy for this process's OpenMP runtime (and its children): `policy`, else
    `$CHTSL_OMP_WAIT`, else `WAIT_POLICY`. Returns the policy set, or None where the user set
    OMP_WAIT_POLICY or GOMP_SPINCOUNT (left alone). Call it before torch is imported: later, libgomp
    has read its settings already (one warning line then)."""
    chosen = policy or os.environ.get("CHTSL_OMP_WAIT") or WAIT_POLICY
    variables = environment(chosen)  # ChtslError on a bad name, whatever else holds
    if any(name in os.environ for name in USER_VARIABLES):
        return None
    if "torch" in sys.modules:
        warn_once(f"the OpenMP wait policy {chosen!r} was set after torch was imported and has no effect")
    os.environ.update(variables)
    return chosen
