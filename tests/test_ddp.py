"""DDP via torchrun (gloo, 2 CPU processes): identical masks on both ranks, and the loss curve of
the single-process run with the same global batch (within 1e-4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import corpus, metrics, small_args
from train.trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # torchrun: two training processes

WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    from tests.conftest import small_args
    from train.trainer import train

    tmp, out = sys.argv[1], sys.argv[2]
    from pathlib import Path

    def dump(step, model):
        if step != 12:
            return
        h = hashlib.sha256()
        for name, layer in sorted(model.sparse_layers().items()):
            h.update(name.encode()); h.update(layer.support_mask().numpy().tobytes())
        w = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            w.update(p.detach().numpy().tobytes())
        Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps({"masks": h.hexdigest(),
                                                                            "weights": w.hexdigest()}))

    train(small_args(Path(tmp), out=str(Path(out) / "ckpt"), steps=12, update_interval=3, restart_warmup=1,
                     warmup=2, eval_every=12, save_every=12, ocr_every=4), after_step=dump)
    """
)


def test_two_rank_gloo_matches_single_process(tmp_path, cache_dir) -> None:
    cache = cache_dir
    corpus(tmp_path)
    common = dict(steps=12, update_interval=3, restart_warmup=1, warmup=2, eval_every=12, save_every=12, ocr_every=4)
    train(small_args(tmp_path, out=str(tmp_path / "single"), **common))  # 2 micro-batches of 4

    ddp_out = tmp_path / "ddp"
    ddp_out.mkdir()
    (tmp_path / "worker.py").write_text(WORKER)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CHTSL_CACHE_DIR": str(cache), "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "worker.py"), str(tmp_path), str(ddp_out)],
        env=env, cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((ddp_out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # identical masks and weights on both ranks

    a = [m for m in metrics(tmp_path / "single") if "step" in m]
    b = [m for m in metrics(ddp_out / "ckpt") if "step" in m]
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 13))
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-4), x["step"]
        assert y["align_loss"] == pytest.approx(x["align_loss"], abs=1e-4)
        assert ("topology" in x) == ("topology" in y)
    assert b[-1]["val_ppl"] == pytest.approx(a[-1]["val_ppl"], rel=1e-3)
    start = json.loads((ddp_out / "ckpt" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2
