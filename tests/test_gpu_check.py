"""scripts/gpu-check.sh without a GPU: it parses, `--dry-run` lists every step, and on a machine without
an NVIDIA GPU it says so in one line and exits 2 before doing anything."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check.sh"
STEPS = ("env", "pytest_cuda", "tiny_train", "eval_rte", "bench60", "bench130", "m60_train", "export", "bench_onnx",
         "kernels", "topology", "csr_train", "bench_decode")
NO_GPU = shutil.which("nvidia-smi") is None and not Path("/dev/nvidia0").exists()


def _run(*args: str, out: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env)


def test_script_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path: Path) -> None:
    proc = _run("--dry-run", out=tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    listed = [line.split()[0] for line in lines if " limit " in line]
    assert tuple(listed) == STEPS
    assert sum(int(line.split()[2].rstrip("s")) for line in lines if " limit " in line) > 0
    text = proc.stdout
    assert "DEV=cuda" in text and "--batch 128 --seq 256 --steps 20" in text  # the paper's protocol
    assert "pytest -m cuda" in text and "--resume" in text and "--device \"$DEV\"" in text
    assert not (tmp_path / "out").exists()  # nothing written


def test_dry_run_only_and_rehearsal_sizes() -> None:
    proc = _run("--dry-run", "--only", "bench60,eval_rte")
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines() if " limit " in line] == ["eval_rte", "bench60"]
    proc = _run("--dry-run", "--rehearse")
    assert proc.returncode == 0 and "DEV=cpu" in proc.stdout and "--batch 2 --seq 16" in proc.stdout


@pytest.mark.parametrize(("args", "fragment"), [
    (("--frobnicate",), "unknown option --frobnicate"),
    (("--dry-run", "--only", "bogus"), "unknown step bogus"),
    (("--budget", "soon"), "--budget must be whole seconds"),
])
def test_bad_input_one_line_exit_2(args: tuple[str, ...], fragment: str) -> None:
    proc = _run(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], proc.stderr


@pytest.mark.skipif(not NO_GPU, reason="this machine has an NVIDIA GPU: the check would run")
def test_without_a_gpu_one_line_exit_2_before_anything(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run(out=out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no NVIDIA GPU"), proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_gpu_extra_requires_triton_only_when_the_code_uses_it() -> None:
    """`pip install '.[gpu]'` pulls only what runs: Triton belongs in the `gpu` extra exactly when library
    code imports it (none does today: CUDA runs on torch's cuSPARSE and cuBLAS operations)."""
    root = SCRIPT.parents[1]
    users = [str(p.relative_to(root)) for d in ("chtsl_infer", "train", "export", "evals")
             for p in sorted((root / d).rglob("*.py"))
             if re.search(r"^\s*(import|from)\s+triton\b", p.read_text(encoding="utf-8"), re.MULTILINE)]
    gpu = re.search(r"^gpu\s*=\s*\[(.*?)\]", (root / "pyproject.toml").read_text(encoding="utf-8"),
                    re.MULTILINE | re.DOTALL)
    assert gpu is not None, "pyproject.toml has no `gpu` extra"
    requirements = re.findall(r"[\"']([^\"']+)[\"']", gpu.group(1))
    assert any(r.startswith("onnxruntime-gpu") for r in requirements)
    assert any(re.match(r"triton\b", r) for r in requirements) == bool(users), (users, requirements)
