"""Shared fixtures: tiny models and a tiny checkpoint (model + BPE tokenizer), never the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import chtsl_infer  # noqa: E402  (registers the Auto classes)
from chtsl_infer.layers import METHODS  # noqa: E402
from chtsl_infer.modeling import ChtslLlamaForCausalLM  # noqa: E402
from chtsl_infer.presets import build_config  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ALL_METHODS = tuple(METHODS)


def tiny_config(method: str = "chtsl", vocab_size: int = 512, **overrides) -> chtsl_infer.ChtslConfig:
    """The `tiny` preset, smaller still (2 layers, small vocab) so tests run in milliseconds."""
    fields = dict(num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=128)
    fields.update(overrides)
    return build_config("tiny", method=method, s_total=0.9, **fields)


def tiny_model(method: str = "chtsl", seed: int = 0, **overrides) -> ChtslLlamaForCausalLM:
    torch.manual_seed(seed)
    return ChtslLlamaForCausalLM(tiny_config(method, **overrides)).eval()


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A 512-token byte-level BPE trained on CPython's own docs (offline, deterministic)."""
    import pydoc_data.topics

    from train.tokenizer import train_bpe

    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    return train_bpe(texts, vocab_size=512)


@pytest.fixture(scope="session", params=["chtsl"])
def tiny_checkpoint(request, tmp_path_factory, bpe_tokenizer) -> Path:
    """A saved tiny checkpoint directory (config.json, model.safetensors, tokenizer) of one method."""
    path = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    model = tiny_model(request.param, vocab_size=len(bpe_tokenizer))
    model.save_pretrained(path)
    bpe_tokenizer.save_pretrained(path)
    return path


def write_corpus(path: Path, topics: int = 40) -> Path:
    """A small jsonl corpus (paragraphs of CPython's pydoc topics) at `path`, written once."""
    import json
    import pydoc_data.topics

    from train.data import _paragraph_documents

    if not path.exists():
        texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)][:topics]
        docs = [d for t in texts for d in _paragraph_documents(t, 200)]
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="session")
def cli_artifacts(tmp_path_factory) -> dict[str, Path]:
    """Built once per session for the CLI error tests: a corpus, a 2-step training checkpoint
    (`run`: config, weights, tokenizer, trainer_state, metrics) and its export (`export`: packed
    safetensors + ONNX). Tests copy them before touching anything."""
    from chtsl_infer.cli import main
    from train.trainer import TrainArgs, train

    root = tmp_path_factory.mktemp("cli-artifacts")
    cache = root / "cache"
    corpus = write_corpus(root / "corpus.jsonl")
    old = {k: os.environ.get(k) for k in ("CHTSL_CACHE", "CHTSL_CACHE_DIR")}
    os.environ["CHTSL_CACHE"] = os.environ["CHTSL_CACHE_DIR"] = str(cache)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainArgs(preset="tiny", data=str(corpus), tokenizer="bpe", vocab_size=512, num_layers=2, seq_len=32,
                        batch_size=4, micro_batch_size=4, steps=2, warmup=1, update_interval=5, restart_warmup=1,
                        eval_every=2, save_every=2, ocr_every=2, eval_tokens=500, out=str(root / "run"),
                        progress=False))
        try:
            main(["export", str(root / "run"), "--out", str(root / "export"), "--format", "all"])
        except SystemExit as e:
            assert not e.code, f"export of the CLI fixture failed ({e.code})"
    finally:
        torch.set_num_threads(threads)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"corpus": corpus, "run": root / "run", "export": root / "export", "cache": cache}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip, with the reason, on machines where torch sees no CUDA device (CI)."""
    if torch.cuda.is_available():
        return
    why = f"needs CUDA: torch {torch.__version__} sees no CUDA device"
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=why))
