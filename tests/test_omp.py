"""The OpenMP runtime under load (chtsl_infer/omp.py): one libgomp in a process, the wait policy the CLI
sets before torch loads it (read back from libgomp itself through OMP_DISPLAY_ENV), the user's own
setting left alone, bad names refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chtsl_infer import omp
from chtsl_infer.errors import ChtslError

ROOT = Path(__file__).resolve().parents[1]


def test_policies_and_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert omp.environment("default") == {}
    assert omp.environment("passive") == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert omp.environment("ACTIVE") == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert omp.environment("spin:10000") == {"GOMP_SPINCOUNT": "10000"}
    omp.environment(omp.WAIT_POLICY)  # the shipped default is a valid policy
    for bad in ("spin:", "spin:-1", "spin:1e4", "lazy", ""):
        with pytest.raises(ChtslError, match="OpenMP wait policy"):
            omp.environment(bad)
    # auto: spin for a decoding command on an idle machine, sleep for anything else
    for idle in (True, False):
        monkeypatch.setattr(omp, "machine_idle", lambda idle=idle: idle)
        assert omp.resolve("auto", "generate") == omp.resolve("auto", "bench") == ("default" if idle else "passive")
        assert omp.resolve("auto", "train") == omp.resolve("auto", None) == "passive"
        assert omp.environment("auto", "generate") == ({} if idle else {"OMP_WAIT_POLICY": "PASSIVE"})
    assert omp.resolve("spin:10", "generate") == "spin:10"


_BUSY = "import time\nend = time.time() + 5\nwhile time.time() < end:\n    pass\n"


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux /proc")
def test_machine_idle_sees_a_process_that_wants_every_cpu() -> None:
    """Beside one busy process per CPU the machine is not idle (whatever else runs beside the tests)."""
    burners = [subprocess.Popen([sys.executable, "-c", _BUSY]) for _ in range(os.cpu_count() or 1)]
    try:
        assert not omp.machine_idle(samples=20)
    finally:
        for p in burners:
            p.kill()
            p.wait()


_ONE_POOL = """
import json
from pathlib import Path
import torch
from chtsl_infer import kernels
if not kernels.cpu_kernel_status()[0]:
    raise SystemExit(3)
a = torch.randn(256, 256)
(a @ a).sum()
crow = torch.arange(0, 65 * 4, 4, dtype=torch.int32)
kernels.spmm_cpu(torch.randn(64, 40), crow, torch.randint(0, 64, (256,), dtype=torch.int16), torch.randn(256))
maps = Path("/proc/self/maps").read_text().splitlines()
print(json.dumps(sorted({line.split()[-1] for line in maps if "libgomp" in line})))
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux /proc")
def test_the_kernels_and_torch_share_one_libgomp() -> None:
    """After a torch matmul and an spmm in a fresh process, one libgomp is mapped (torch's): the kernels'
    library binds to the copy torch loaded, so both run on one OpenMP pool. A fresh process, because
    this one may hold other packages' copies (scikit-learn's, imported by lm-eval in other tests)."""
    proc = subprocess.run([sys.executable, "-c", _ONE_POOL], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip("no compiled kernels")
    assert proc.returncode == 0, proc.stderr[-2000:]
    mapped = json.loads(proc.stdout.strip().splitlines()[-1])
    if not mapped:
        pytest.skip("this torch does not use GNU OpenMP")
    assert len(mapped) == 1, mapped
    assert "torch" in mapped[0], mapped


def _chtsl(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """`chtsl ARGV` in a fresh process, libgomp printing the settings it read (OMP_DISPLAY_ENV=VERBOSE)."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "CHTSL_OMP_WAIT")}
    return subprocess.run([sys.executable, "-m", "chtsl_infer.cli", *argv],
                          env={**base, "PYTHONPATH": str(ROOT), "OMP_DISPLAY_ENV": "VERBOSE", **env},
                          capture_output=True, text=True, timeout=600)


SPINS = {"passive": "0", "default": "300000"}  # libgomp's spin count for these policies


@pytest.mark.parametrize(("env", "read"), [
    ({}, {"GOMP_SPINCOUNT": "0"}),  # the default, auto, sleeps for a command that does not decode
    ({"CHTSL_OMP_WAIT": "spin:1234"}, {"GOMP_SPINCOUNT": "1234"}),
    ({"CHTSL_OMP_WAIT": "passive", "OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),  # the user's own
    pytest.param({"CHTSL_OMP_WAIT": "default"}, {"GOMP_SPINCOUNT": "300000"}, marks=pytest.mark.slow),
    pytest.param({"CHTSL_OMP_WAIT": "passive"}, {"GOMP_SPINCOUNT": "0"}, marks=pytest.mark.slow),
])
def test_the_cli_sets_the_wait_policy_before_torch_loads_libgomp(env: dict[str, str], read: dict[str, str]) -> None:
    """What libgomp itself read when torch loaded it (its OMP_DISPLAY_ENV report on stderr)."""
    proc = _chtsl(env, "info", "--kernels", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    if "OPENMP DISPLAY ENVIRONMENT" not in proc.stderr:
        pytest.skip("this torch's OpenMP runtime does not print OMP_DISPLAY_ENV")
    shown = dict(line.strip().split(" = ", 1) for line in proc.stderr.splitlines() if " = " in line)
    for name, value in read.items():
        assert shown[name].strip("'").upper() == value, (name, shown.get(name))


def test_a_bad_policy_name_is_one_error_line() -> None:
    proc = _chtsl({"CHTSL_OMP_WAIT": "lazy"}, "info", "--preset", "tiny")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: unknown OpenMP wait policy"), lines
