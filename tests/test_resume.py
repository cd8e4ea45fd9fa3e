"""Exact resume (bit-identical on CPU) and crash safety of checkpoint writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import corpus, metrics, small_args
from train.args import TrainArgs
from train.trainer import train

STEPS = 12  # topology updates at 3 and 6 (T_end = 9: none there, ζ_t = 0) with restarted warm-ups


pytestmark = pytest.mark.usefixtures("one_thread", "cache_dir")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v for k, v in load_file(path / "model.safetensors").items()}
    for name in ("optimizer", "topology", "rng"):
        out.update({f"{name}/{k}": v for k, v in load_file(path / "trainer_state" / f"{name}.safetensors").items()})
    return out


def _losses(path: Path) -> list[tuple[int, float, float]]:
    return [(m["step"], m["loss"], m["lr"]) for m in metrics(path) if "step" in m]


@pytest.mark.slow  # interrupted and resumed training runs
@pytest.mark.parametrize("stop", [6])  # an update iteration; the resumed run starts in a restarted warm-up
def test_resume_is_bit_identical(tmp_path, stop) -> None:
    common = dict(steps=STEPS, update_interval=3, restart_warmup=1, warmup=2, save_every=100, eval_every=100,
                  ocr_every=4)
    full = train(small_args(tmp_path, out=str(tmp_path / "full"), **common))
    first = train(small_args(tmp_path, out=str(tmp_path / "part"), stop_at=stop, **common))
    assert first.step == stop
    assert json.loads((tmp_path / "part" / "trainer_state" / "state.json").read_text())["step"] == stop
    second = train(small_args(tmp_path, resume=str(tmp_path / "part"), out=str(tmp_path / "part"), **common))
    assert second.step == STEPS and full.topology_updates == 2  # updates at 3 and 6
    a, b = _tensors(tmp_path / "full"), _tensors(tmp_path / "part")
    assert a.keys() == b.keys()
    # the support: engine masks (masked storage) or the model's CSR indices (csr storage)
    assert any(k.startswith("topology/mask.") or k.endswith(".col_indices") for k in a)
    assert any(k.endswith(".exp_avg_sq") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")
    assert second.val_ppl == full.val_ppl


# `chtsl train` in a subprocess whose checkpoint writes pause for 4 s once the weights, optimizer and
# RNG files are written, before the state files and the swap: a window to SIGKILL it mid-save.
_SLOW_SAVE = """
import time
import train.checkpoint as ckpt_io
save_file = ckpt_io.save_file
def save_then_pause(tensors, path, *args, **kwargs):
    save_file(tensors, path, *args, **kwargs)
    if str(path).endswith("rng.safetensors"):
        time.sleep(4)
ckpt_io.save_file = save_then_pause
from chtsl_infer.cli import main
main()
"""


@pytest.mark.slow  # a training subprocess, killed mid-save
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path) -> None:
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-c", _SLOW_SAVE, "train", "--data", str(corpus(tmp_path)), "--vocab-size", "512",
           "--num-layers", "2", "--seq-len", "32", "--batch-size", "8", "--micro-batch-size", "4",
           "--steps", "4", "--warmup", "4",
           "--save-every", "2", "--eval-every", "100", "--update-interval", "3", "--restart-warmup", "1",
           "--out", str(out), "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "trainer_state" / "state.json"
    deadline = time.time() + 240
    try:
        # Wait until the step-2 checkpoint is published and the step-4 write has started.
        while time.time() < deadline and not (state.is_file() and json.loads(state.read_text())["step"] == 2
                                              and list(tmp_path.glob(".ckpt.tmp-*"))):
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
        assert list(tmp_path.glob(".ckpt.tmp-*")), "the second save never started"
        time.sleep(1.0)  # inside the write (paused 4 s before the state files and the swap)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads(state.read_text())["step"] == 2
    from chtsl_infer.formats.model_dir import load_model

    load_model(out)  # complete and loadable
    r = train(TrainArgs(resume=str(out), progress=False))  # everything else from the checkpoint
    assert r.step == 4 and not list(tmp_path.glob(".ckpt.tmp-*"))
    steps = [m["step"] for m in metrics(out) if "step" in m]
    assert steps == [1, 2, 3, 4]  # lines logged after the step-2 checkpoint were dropped on resume
