"""The benchmark scripts run (tiny shapes, one repeat): they import library code that moves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # child processes that build kernels and models

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_train_step_benchmark_reports_every_configuration(tmp_path) -> None:
    out = tmp_path / "train_step.json"
    _run("train_step.py", "--shapes", "tiny", "--methods", "chtsl,cola", "--sparse-storage", "masked,csr",
         "--steps", "1", "--repeats", "1", "--threads", "1", "--json", str(out))
    rows = json.loads(out.read_text())
    rows = rows["tiny"] if isinstance(rows, dict) else rows
    got = {(r["method"], r["storage"]) for r in rows}
    assert got == {("dense", "masked"), ("chtsl", "masked"), ("chtsl", "csr"), ("cola", "masked")}
    for r in rows:
        assert r["step_s"] > 0 and r["linear_state_ratio"] > 0
        assert (r["topology_share"] is not None) == (r["method"] == "chtsl")


@pytest.mark.parametrize("script,args", [
    ("model.py", ["--preset", "tiny", "--batch", "2", "--seq", "8", "--rounds", "1", "--threads", "1"]),
    ("kernels.py", ["--shapes", "llama60m", "--tokens", "1,16", "--repeats", "1", "--threads", "1"]),
])
def test_benchmark_script_runs(script: str, args: list[str]) -> None:
    assert "dense" in _run(script, *args)
