"""Shared fixtures: tiny models and a tiny checkpoint (model + BPE tokenizer), never the network."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The built-in kernel settings: no 20 s tuning in the suite, and no result that depends on a cached tuning
# (inherited by the CLI subprocesses the tests start). tests/test_tune.py turns it on with a tiny budget.
os.environ["CHTSL_TUNE"] = "0"

import chtsl_infer  # noqa: E402  (registers the Auto classes)
from chtsl_infer.model.methods import METHODS  # noqa: E402
from chtsl_infer.model.modeling import ChtslLlamaForCausalLM  # noqa: E402
from chtsl_infer.model.presets import build_config  # noqa: E402

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


def tiny_model_nonzero_b(method: str = "chtsl", **overrides) -> ChtslLlamaForCausalLM:
    """`tiny_model` whose low-rank B is non-zero (SLTrain initialises B = 0, which would hide bugs)."""
    model = tiny_model(method, **overrides)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.chtsl_layers().values():
            if layer.lora_B is not None:
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
    return model


def lowrank_branch(layer, x: torch.Tensor) -> torch.Tensor:
    """scale · B σ(A x) of a `SparseLowRankLinear`: (..., in) -> (..., out), as its forward computes it."""
    return layer.lowrank_up(layer.lowrank_hidden(x))


def random_ids(batch: int = 2, seq: int = 37, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    """(batch, seq) int64 token ids drawn uniformly from the vocabulary, reproducible by `seed`."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_one_call_equals_the_block_loop(rt, ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch,
                                          item_bytes: int) -> None:
    """Decoding `ids` (2, 14) with runtime `rt` gives the same logits and KV cache, bit for bit, through
    `kernels.DecodeLayers` (every block in one C call) as through feature_major's block loop: a 6-token
    prefill, then 1, 2, 3, 1 and 1 tokens per sequence, with `item_bytes` work items."""
    from chtsl_infer.kernels.settings import override
    from chtsl_infer.runtime import feature_major

    real = feature_major._decode_layers
    runs = {}
    for name, plan in (("blocks", real), ("loop", lambda *a: None)):
        monkeypatch.setattr(feature_major, "_decode_layers", plan)
        cache = rt.new_cache(2, 14)
        with override(decode_item_bytes=item_bytes):
            steps = [rt.decode_step(ids[:, :6], cache)]
            steps += [rt.decode_step(ids[:, a:b], cache) for a, b in ((6, 7), (7, 9), (9, 12), (12, 13), (13, 14))]
        runs[name] = (torch.stack(steps), torch.stack(cache.key), torch.stack(cache.value))
    monkeypatch.setattr(feature_major, "_decode_layers", real)
    for got, want in zip(runs["blocks"], runs["loop"], strict=True):
        assert torch.equal(got, want)


# A block's linears as the runtime fuses them: members of a group share an input and one CSR.
BLOCK_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
                ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))


def _group_linears(packed):  # packed: PackedModel
    for i in range(packed.config.num_hidden_layers):
        for parent, members in BLOCK_GROUPS:
            yield [packed.linears[f"model.layers.{i}.{parent}.{m}"] for m in members]


def expected_linear_bytes(packed, backend: str, value_bytes: int) -> int:  # packed: PackedModel
    """Bytes of the fused groups of the runtime model built from `packed`, written out from the packed
    tensors (`runtime.cost` counts the built model's). Per group: sparse backend — values, columns
    (their packed dtype; 8-bit deltas as int16 columns without the padding links where the settings in
    force widen them), int32 row pointers (Σout + 1) and row order (Σout); dense backend — the
    densified S or the dense weight (Σout × in); both — A, B and the int32 (2, members) shapes."""
    from chtsl_infer.formats.encoding import padding_links
    from chtsl_infer.kernels.settings import settings

    total = 0
    for group in _group_linears(packed):
        outs, n_in = sum(lin.out_features for lin in group), group[0].in_features
        if group[0].has_sparse and backend == "sparse":
            nnz = sum(lin.nnz for lin in group)
            col_bytes = group[0].col_indices.element_size()
            if group[0].col_indices.dtype == torch.uint8 and settings().widen_deltas:
                nnz -= sum(int(padding_links(lin.crow_indices, lin.col_indices, lin.values).sum()) for lin in group)
                col_bytes = 2
            total += nnz * (value_bytes + col_bytes) + 4 * (outs + 1) + 4 * outs
        elif group[0].has_sparse or group[0].weight is not None:
            total += outs * n_in * value_bytes
        if group[0].has_lowrank:
            total += value_bytes * sum(lin.lora_A.numel() + lin.lora_B.numel() for lin in group) + 4 * 2 * len(group)
    return total


def expected_flops(packed, backend: str) -> int:  # packed: PackedModel
    """FLOPs per token of a forward's linears and lm_head of the runtime model built from `packed`."""
    cfg = packed.config
    entries = cfg.vocab_size * cfg.hidden_size  # the lm_head
    for lin in packed.linears.values():
        if lin.has_sparse:
            entries += lin.nnz if backend == "sparse" else lin.out_features * lin.in_features
        elif lin.weight is not None:
            entries += lin.weight.numel()
        if lin.has_lowrank:
            entries += lin.lora_A.numel() + lin.lora_B.numel()
    return 2 * entries


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A 512-token byte-level BPE trained on CPython's own docs (offline, deterministic)."""
    import pydoc_data.topics

    from train.data.tokenizer import train_bpe

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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread (modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`):
    these models are too small for intra-op threads to pay, and on a small shared CPU torch's
    spinning OpenMP threads make a tiny model ~30x slower when the cores are oversubscribed
    (measured: 0.96 s vs 0.03 s a forward)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _candidate_extreme(pick) -> dict[str, int]:
    from chtsl_infer.kernels.tune import CANDIDATES

    return {name: pick(values) for name, values in CANDIDATES.items()}


# What the tuner can pick, in few runs that reach every distinct code path: each setting's smallest and
# largest candidate (32- vs 64-token tiles at wide inputs, a 16-token tile at 1 token vs the gather loop up
# to 4 tokens, 1 vs 8 row chunks per thread, 16 vs 256 KiB work items, attention always vs never split,
# 16/64-token training tiles, SDDMM tiles by their buffer rule), the defaults, and each build variant
# (with the defaults).
KERNEL_VARIANTS = {
    "defaults": ({}, ""),
    "smallest": (_candidate_extreme(min), ""),
    "largest": (_candidate_extreme(max), ""),
    "vw8": ({}, "vw8"),
    "g8": ({}, "g8"),
}


@pytest.fixture(params=list(KERNEL_VARIANTS))
def kernel_variant(request: pytest.FixtureRequest) -> str:
    """Runs the test under one of `KERNEL_VARIANTS` (settings overridden, the build variant in force);
    a build variant that does not apply to this CPU is skipped."""
    from chtsl_infer.kernels import build
    from chtsl_infer.kernels.settings import override
    from chtsl_infer.kernels.table import BUILD_VARIANTS

    changes, variant = KERNEL_VARIANTS[request.param]
    base = build.library()[0]
    if base is None:
        pytest.skip("no compiled kernels")
    lib = base
    if variant:
        if not BUILD_VARIANTS[variant].applies(base.probed()):
            pytest.skip(f"the {variant} build variant does not apply to this CPU")
        lib, why = build.variant_library(variant)
        assert lib is not None and lib.variant == variant, why
    with override(**changes), build.use_library(lib):
        yield request.param


@pytest.fixture
def no_compiled_kernels(monkeypatch: pytest.MonkeyPatch) -> str:
    """The compiled CPU kernels unavailable, as without a C compiler: every kernel user takes its torch
    path. Returns the reason `cpu_kernel_status()` gives."""
    from chtsl_infer.kernels import build

    why = "no compiler (test)"
    monkeypatch.setattr(build, "library", lambda: (None, why))
    return why


@pytest.fixture(scope="session")
def bpe_cache(tmp_path_factory) -> Path:
    """One cache root for the session: the same corpus trains the same BPE once."""
    return tmp_path_factory.mktemp("chtsl-cache")


@pytest.fixture
def cache_dir(bpe_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`$CHTSL_CACHE_DIR` pointed at the session's cache (tokenizers trained by earlier tests)."""
    monkeypatch.setenv("CHTSL_CACHE_DIR", str(bpe_cache))
    return bpe_cache


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `chtsl ARGV` run in this process (usable from module-scoped
    fixtures, unlike capsys)."""
    from chtsl_infer.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- training runs

TRAIN_STEPS = 20


def write_corpus(path: Path, topics: int = 40) -> Path:
    """A small jsonl corpus (paragraphs of CPython's pydoc topics) at `path`, written once."""
    import json
    import pydoc_data.topics

    from train.data.sources import _paragraph_documents

    if not path.exists():
        texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)][:topics]
        docs = [d for t in texts for d in _paragraph_documents(t, 200)]
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def corpus(tmp_path: Path) -> Path:
    """The trainer tests' corpus: `write_corpus` in `tmp_path/corpus.jsonl`."""
    return write_corpus(tmp_path / "corpus.jsonl")


def small_args(tmp_path: Path, **overrides):  # -> train.args.TrainArgs
    """2 blocks, seq 32, global batch 8 in micro-batches of 4, 20 steps, updates every 5 steps."""
    from train.args import TrainArgs

    fields = dict(
        preset="tiny", data=str(corpus(tmp_path)), tokenizer="bpe", vocab_size=512, num_layers=2, seq_len=32,
        batch_size=8, micro_batch_size=4, steps=TRAIN_STEPS, warmup=4, update_interval=5, restart_warmup=2,
        eval_every=10, save_every=10, ocr_every=5, eval_tokens=2000, out=str(tmp_path / "ckpt"), progress=False,
    )
    fields.update(overrides)
    return TrainArgs(**fields)


def metrics(path: Path) -> list[dict]:
    """The records of `path/metrics.jsonl`."""
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]


# The worker `train_two_ranks` runs on each rank: argv = tmp_path, output directory, overrides (JSON);
# the caller's `summary(model) -> dict` is inserted before `after_step`.
_RANK_WORKER_HEAD = """
import hashlib, json, os, sys
from pathlib import Path
from tests.conftest import small_args
from train.trainer import train

tmp, out, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
"""
_RANK_WORKER_TAIL = """
def after_step(step, model):
    if step == overrides["steps"]:
        Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps(summary(model)))

train(small_args(Path(tmp), out=str(Path(out) / "ckpt"), **overrides), after_step=after_step)
"""


def train_two_ranks(tmp_path: Path, cache: Path, summary: str, **overrides) -> tuple[list[dict], Path]:
    """Trains `small_args(tmp_path, **overrides)` (`steps` among them) under torchrun: DDP over gloo
    on two single-threaded CPU processes, offline, `$CHTSL_CACHE_DIR` = `cache`.

    `summary` is the source of a function `summary(model) -> dict` (JSON; `hashlib`, `json`, `os`,
    `Path` are imported) each rank runs after the last step. Returns (the two ranks' summaries, the
    run's output directory `tmp_path/ddp/ckpt`); fails the test if torchrun fails.
    """
    out = tmp_path / "ddp"
    out.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(_RANK_WORKER_HEAD + textwrap.dedent(summary) + _RANK_WORKER_TAIL)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CHTSL_CACHE_DIR": str(cache), "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(tmp_path), str(out), json.dumps(overrides)],
        env=env, cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], out / "ckpt"


@pytest.fixture(scope="session")
def cli_artifacts(tmp_path_factory) -> dict[str, Path]:
    """Built once per session for the CLI error tests: a corpus, a 2-step training checkpoint
    (`run`: config, weights, tokenizer, trainer_state, metrics) and its export (`export`: packed
    safetensors + ONNX). Tests copy them before touching anything."""
    from chtsl_infer.cli import main
    from train.args import TrainArgs
    from train.trainer import train

    root = tmp_path_factory.mktemp("cli-artifacts")
    cache = root / "cache"
    corpus = write_corpus(root / "corpus.jsonl")
    old = {k: os.environ.get(k) for k in ("CHTSL_CACHE_DIR",)}
    os.environ["CHTSL_CACHE_DIR"] = str(cache)
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
