"""CUDA paths against CPU references: cuSPARSE kernels, the inference runtime's backends, the bf16
packed round trip, CUDA peak-memory accounting of `chtsl bench`, CH2-L3n scoring, ONNX Runtime's CUDA
provider (the training op `csr_linear` on CUDA: tests/test_csr.py). Every test is marked `cuda`:
`pytest -m cuda` runs them (scripts/gpu-check.sh does), and where torch sees no CUDA device they
skip with the reason (conftest.py), so CI stays CPU-only.

Tolerances: fp32 on CUDA as the CPU tests' 1e-4 max |Δlogits| (torch keeps TF32 off for fp32
matmuls by default); bf16 *weights* computed in fp32 as the packed format's ‖Δ‖/‖ref‖ ≤ 1e-2; bf16
weights *and* activations (every GEMM input rounded to 8 mantissa bits, over all blocks) ≤ 2e-2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chtsl_infer.formats.model_dir import load_packed, save_packed
from chtsl_infer.formats.packed import pack_model, unpack_model
from chtsl_infer.runtime.backends import from_packed, load_runtime, random_packed, resolve_backend
from tests.conftest import ALL_METHODS, random_ids, tiny_config, tiny_model_nonzero_b

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
ATOL = 1e-4
REL_BF16_WEIGHTS = 1e-2
REL_BF16_COMPUTE = 2e-2


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().cpu(), ref.float().cpu()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_runtime_backends_on_cuda_match_cpu_dense(method: str) -> None:
    packed = pack_model(tiny_model_nonzero_b(method))
    ids = random_ids(2, 37)
    ref = from_packed(packed, "dense").logits(ids)  # CPU fp32: the reference backend
    assert resolve_backend("auto", packed, CUDA) == "dense"
    for backend in ("dense", "sparse"):
        rt = from_packed(packed, backend, CUDA)
        got = rt.logits(ids)
        assert got.device.type == CUDA.type and got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), ref, atol=ATOL, rtol=0)
        with torch.no_grad():  # the token-major transformers path (generate's)
            token_major = rt.model(input_ids=ids.to(CUDA), use_cache=False).logits
        torch.testing.assert_close(token_major.cpu(), ref, atol=ATOL, rtol=0)
        one = random_ids(1, 1, seed=3)  # decoding shape: one token
        torch.testing.assert_close(rt.logits(one).cpu(), from_packed(packed, "dense").logits(one), atol=ATOL, rtol=0)
        half = from_packed(packed, backend, CUDA, torch.bfloat16)
        out = half.logits(ids)
        assert out.dtype == torch.bfloat16
        assert _rel(out, ref) <= REL_BF16_COMPUTE, (backend, _rel(out, ref))
        if backend == "sparse" and method not in ("dense", "cola"):  # S held by cuSPARSE in the compute dtype
            csr = half.model.model.layers[0].self_attn.q_proj.group.cuda_csr
            assert csr is not None and csr.device.type == CUDA.type and csr.values().dtype == torch.bfloat16
            assert csr.crow_indices().dtype == csr.col_indices().dtype == torch.int32
            assert half.model_bytes < from_packed(packed, "dense", CUDA, torch.bfloat16).model_bytes


def test_generate_on_cuda_matches_cpu_greedy() -> None:
    packed = pack_model(tiny_model_nonzero_b("chtsl"))
    prompt = random_ids(1, 6, seed=5)
    want = from_packed(packed, "dense").generate(prompt, max_new_tokens=8)
    for backend in ("dense", "sparse"):
        assert torch.equal(from_packed(packed, backend, CUDA).generate(prompt, max_new_tokens=8), want), backend


def test_bf16_packed_round_trip_on_cuda(tmp_path: Path) -> None:
    model = tiny_model_nonzero_b("chtsl")
    save_packed(pack_model(model, torch.bfloat16), tmp_path / "model.safetensors")
    packed = load_packed(tmp_path)
    assert packed.dtype == torch.bfloat16
    ids = random_ids(2, 23)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        # The training-form model of the bf16 file, on CUDA, in bf16 (as the CPU test does natively).
        native = unpack_model(packed, torch.bfloat16).to(CUDA)(input_ids=ids.to(CUDA), use_cache=False).logits
    assert 0 < _rel(native, ref) <= REL_BF16_WEIGHTS
    for backend in ("dense", "sparse"):
        fp32 = load_runtime(tmp_path, backend, CUDA, torch.float32).logits(ids)
        assert 0 < _rel(fp32, ref) <= REL_BF16_WEIGHTS, (backend, _rel(fp32, ref))
        bf16 = load_runtime(tmp_path, backend, CUDA, torch.bfloat16).logits(ids)
        assert _rel(bf16, ref) <= REL_BF16_COMPUTE, (backend, _rel(bf16, ref))


def test_cuda_kernel_on_the_runtime_groups_matches_cpu_kernel() -> None:
    """The fused groups' cuSPARSE product equals the CPU kernel's on the same stacked CSR."""
    packed = random_packed(tiny_config("chtsl"), seed=3)
    cpu = from_packed(packed, "sparse").model.model.layers[1].mlp.gate_proj.group
    gpu = from_packed(packed, "sparse", CUDA).model.model.layers[1].mlp.gate_proj.group
    x = torch.randn(cpu.in_features, 70, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gpu.forward_fm(x.to(CUDA)).cpu(), cpu.forward_fm(x), atol=ATOL, rtol=0)


def test_bench_worker_cuda_peak_memory_accounting() -> None:
    """`peak_memory_bytes` on CUDA is torch's max allocated over the forwards (reset after the build):
    at least the resident model plus the logits buffer, equal to `peak_tensor_bytes`."""
    from chtsl_infer.commands.bench import run_worker
    from chtsl_infer.model.presets import build_config

    base = {"preset": "tiny", "s_total": 0.9, "ckpt": None, "batch": 4, "seq": 64, "steps": 2, "warmup": 1,
            "device": "cuda", "dtype": "bfloat16"}
    reports = {}
    for method, backend in (("dense", "dense"), ("chtsl", "sparse"), ("chtsl", "dense")):
        torch.cuda.empty_cache()
        r = run_worker({**base, "method": method, "backend": backend, "label": f"{method} [{backend}]"})
        logits_bytes = 4 * 64 * build_config("tiny").vocab_size * 2  # bf16
        assert r["peak_scope"] == "forwards" and r["base_rss_bytes"] == 0
        assert r["peak_tensor_bytes"] == r["peak_memory_bytes"] >= r["model_bytes"] + logits_bytes
        assert r["build_peak_bytes"] >= r["model_bytes"] > 0
        assert r["tokens_per_s"] > 0 and len(r["step_s"]) == 2
        reports[(method, backend)] = r
    assert reports[("chtsl", "sparse")]["model_bytes"] < 0.75 * reports[("dense", "dense")]["model_bytes"]


def test_bench_cli_on_cuda(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code = "import sys; from chtsl_infer.cli import main; main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, "bench", "--preset", "tiny", "--device", "cuda", "--batch", "2",
                           "--seq", "16", "--steps", "2", "--warmup", "1", "--backend", "dense,sparse", "--json",
                           str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["settings"]["dtype"] == "bfloat16" and report["settings"]["device"] == "cuda"  # CUDA defaults
    rows = report["results"]
    assert [r["backend"] for r in rows] == ["dense", "dense", "sparse"]
    assert all(r["peak_memory_bytes"] > 0 and r["peak_scope"] == "forwards" for r in rows)


def test_ch2_l3n_scores_on_cuda_match_cpu() -> None:
    """CH2-L3n on CUDA (float64 products) equals the CPU scores; D = M Mᵀ stays exact with TF32 on."""
    from train.topology import brf_mask, ch2_l3n_scores

    mask = brf_mask(96, 64, 0.9, 0.3, torch.Generator().manual_seed(0))
    ref = ch2_l3n_scores(mask)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            got = ch2_l3n_scores(mask.to(CUDA))
            assert got.device.type == CUDA.type and got.dtype == torch.float32
            torch.testing.assert_close(got.cpu(), ref, atol=0, rtol=1e-6)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_onnx_cuda_provider(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)")
    from chtsl_infer.cli import main

    out = tmp_path / "export"
    with pytest.raises(SystemExit) as e:
        main(["export", str(tiny_checkpoint), "--format", "all", "--device", "cuda", "--out", str(out),
              "--json", str(tmp_path / "s.json")])
    assert e.value.code in (0, None)
    checks = json.loads((tmp_path / "s.json").read_text())["verification"]
    runtimes = {c["runtime"] for c in checks}
    assert {"ORT CUDA", "ORT CPU", "runtime dense cuda", "runtime sparse cuda"} <= runtimes
    assert all(c["ok"] for c in checks)
    ids = random_ids(2, 13, vocab=load_packed(out).config.vocab_size)
    ref = load_runtime(out, "dense").logits(ids)
    torch.testing.assert_close(load_runtime(out, "onnx", CUDA).logits(ids), ref, atol=ATOL, rtol=0)

