"""DDP via torchrun (gloo, 2 CPU processes): identical masks on both ranks, and the loss curve of
the single-process run with the same global batch (within 1e-4)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import corpus, metrics, small_args, train_two_ranks
from train.trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # torchrun: two training processes

SUMMARY = """
def summary(model):
    h = hashlib.sha256()
    for name, layer in sorted(model.sparse_layers().items()):
        h.update(name.encode()); h.update(layer.support_mask().numpy().tobytes())
    w = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        w.update(p.detach().numpy().tobytes())
    return {"masks": h.hexdigest(), "weights": w.hexdigest()}
"""


def test_two_rank_gloo_matches_single_process(tmp_path, cache_dir) -> None:
    corpus(tmp_path)
    common = dict(steps=12, update_interval=3, restart_warmup=1, warmup=2, eval_every=12, save_every=12, ocr_every=4)
    train(small_args(tmp_path, out=str(tmp_path / "single"), **common))  # 2 micro-batches of 4

    ranks, ddp_ckpt = train_two_ranks(tmp_path, cache_dir, SUMMARY, **common)
    assert ranks[0] == ranks[1]  # identical masks and weights on both ranks

    a = [m for m in metrics(tmp_path / "single") if "step" in m]
    b = [m for m in metrics(ddp_ckpt) if "step" in m]
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 13))
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-4), x["step"]
        assert y["align_loss"] == pytest.approx(x["align_loss"], abs=1e-4)
        assert ("topology" in x) == ("topology" in y)
    assert b[-1]["val_ppl"] == pytest.approx(a[-1]["val_ppl"], rel=1e-3)
    start = json.loads((ddp_ckpt / "metrics.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2
