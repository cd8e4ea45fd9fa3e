"""Inference backends: every backend's logits match the `dense` backend (and the training-form
model) within 1e-4 in fp32, for every method; fusion, loading, generate and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chtsl_infer import kernels
from chtsl_infer.errors import ChtslError
from chtsl_infer.formats.model_dir import save_packed
from chtsl_infer.formats.packed import pack_model
from chtsl_infer.kernels.settings import KernelSettings
from chtsl_infer.model.layers import layer_link_count
from chtsl_infer.model.modeling import ChtslLlamaForCausalLM
from chtsl_infer.runtime.backends import (
    from_packed,
    load_runtime,
    random_packed,
    resolve_backend,
)
from chtsl_infer.runtime.fused import FusedLinears
from tests.conftest import (
    ALL_METHODS,
    assert_one_call_equals_the_block_loop,
    random_ids,
    tiny_config,
    tiny_model_nonzero_b,
)

ATOL = 1e-4


@pytest.mark.parametrize("method", ALL_METHODS)
def test_torch_backends_match_dense_backend_and_training_model(method: str) -> None:
    model = tiny_model_nonzero_b(method)
    ids = random_ids()  # 74 tokens: a full kernel tile plus a tail
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    packed = pack_model(model)
    dense = from_packed(packed, "dense").logits(ids)
    sparse = from_packed(packed, "sparse").logits(ids)
    torch.testing.assert_close(dense, reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(sparse, dense, atol=ATOL, rtol=0)
    with torch.no_grad():  # the token-major transformers path of the runtime model (generate's)
        sparse_tm = from_packed(packed, "sparse").model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(sparse_tm, dense, atol=ATOL, rtol=0)
    one = random_ids(batch=1, seq=1, seed=3)  # decoding shape: one token
    torch.testing.assert_close(from_packed(packed, "sparse").logits(one), from_packed(packed, "dense").logits(one),
                               atol=ATOL, rtol=0)


def _export_onnx(model: ChtslLlamaForCausalLM, out: Path) -> None:
    """model.onnx (input_ids -> logits, dynamic batch/seq) + config.json, like `chtsl export`."""

    class Logits(torch.nn.Module):
        def __init__(self, m: ChtslLlamaForCausalLM) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, use_cache=False).logits

    out.mkdir(parents=True, exist_ok=True)
    dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=128)}
    torch.onnx.export(Logits(model).eval(), (random_ids(2, 9),), str(out / "model.onnx"), input_names=["input_ids"],
                      output_names=["logits"], dynamic_shapes={"input_ids": dims}, dynamo=True, verbose=False)
    model.config.save_pretrained(out)


@pytest.mark.slow  # ONNX export per method
@pytest.mark.parametrize("method", ALL_METHODS)
def test_onnx_backend_matches_dense_backend(method: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tiny_model_nonzero_b(method, num_hidden_layers=1)
    _export_onnx(model, tmp_path)
    ids = random_ids(3, 21)
    onnx_logits = load_runtime(tmp_path, "onnx").logits(ids)
    dense = from_packed(pack_model(model), "dense").logits(ids)
    torch.testing.assert_close(onnx_logits, dense, atol=ATOL, rtol=0)


@pytest.mark.slow  # ONNX export with a KV cache
def test_onnx_backend_generates_with_the_graphs_kv_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`chtsl export`'s graph (past_key_values in, present out): greedy generation equals the torch
    backends', feeding one token per step after the prefill (no quadratic recompute)."""
    pytest.importorskip("onnxruntime")
    from chtsl_infer.runtime.backends import OnnxCache
    from export.onnx import export_onnx

    model = tiny_model_nonzero_b("chtsl", num_hidden_layers=1)
    export_onnx(model, tmp_path / "model.onnx")
    model.config.save_pretrained(tmp_path)
    rt = load_runtime(tmp_path, "onnx")
    fed: list[int] = []
    original = OnnxCache.run

    def spy(self: OnnxCache, session, input_ids: torch.Tensor) -> torch.Tensor:
        fed.append(input_ids.shape[1])
        return original(self, session, input_ids)

    monkeypatch.setattr(OnnxCache, "run", spy)
    prompt = random_ids(2, 6, seed=5)
    got = rt.generate(prompt, max_new_tokens=7)
    assert fed == [6] + [1] * 6
    assert torch.equal(got, from_packed(pack_model(model), "sparse").generate(prompt, max_new_tokens=7))
    ids = random_ids(3, 21)
    torch.testing.assert_close(rt.logits(ids), from_packed(pack_model(model), "dense").logits(ids), atol=ATOL, rtol=0)


def test_fused_group_computes_once_per_input(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = from_packed(pack_model(tiny_model_nonzero_b("chtsl")), "sparse")
    calls: list[int] = []
    original = FusedLinears.forward_fm

    def counting(self: FusedLinears, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(len(self.outs))
        return original(self, x, out)

    monkeypatch.setattr(FusedLinears, "forward_fm", counting)
    layers = rt.config.num_hidden_layers
    for run in (lambda: rt.logits(random_ids(1, 5)),  # feature-major path
                lambda: rt.model(input_ids=random_ids(1, 5), use_cache=False)):  # transformers path (members)
        calls.clear()
        run()
        assert sorted(calls) == sorted([3, 1, 2, 1] * layers)  # (q,k,v), o, (gate,up), down per block
    group = rt.model.model.layers[0].self_attn.q_proj.group
    assert group._x is None and group._parts == []  # no activation kept after the forward


def test_logits_out_buffer_and_workspace_reuse() -> None:
    rt = from_packed(pack_model(tiny_model_nonzero_b("chtsl")), "sparse")
    ids = random_ids(2, 19)
    want = rt.logits(ids)
    buf = rt.workspace["gate_up"]
    out = torch.full_like(want, float("nan"))
    assert rt.logits(ids, out=out).data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    assert rt.workspace["gate_up"].data_ptr() == buf.data_ptr()  # reused, not re-allocated
    torch.testing.assert_close(rt.logits(ids[:1, :7]), want[:1, :7], atol=ATOL, rtol=0)  # new shape: resized
    assert rt.workspace["gate_up"].shape[1] == 7


def test_feature_major_forward_with_grouped_query_attention() -> None:
    model = tiny_model_nonzero_b("chtsl", num_key_value_heads=2)
    assert model.config.num_attention_heads > 2
    ids = random_ids(3, 11)
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    for backend in ("dense", "sparse"):
        torch.testing.assert_close(from_packed(pack_model(model), backend).logits(ids), reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_generate_matches_transformers_generate_greedy(method: str) -> None:
    """The lean KV-cache path (prefill + one-token steps) decodes what transformers' generate() does."""
    model = tiny_model_nonzero_b(method, num_key_value_heads=2)  # GQA: the cache holds fewer heads than the queries
    prompt = random_ids(2, 6, seed=5)
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=12, do_sample=False, temperature=None, top_p=None,
                              top_k=None, pad_token_id=0)
    for backend in ("dense", "sparse"):
        got = from_packed(pack_model(model), backend).generate(prompt, max_new_tokens=12)
        assert torch.equal(got, want), backend


def test_decode_steps_match_full_forward_logits(kernel_variant: str) -> None:
    """Prefill, a 3-token chunk after cached tokens, then single tokens: each position's logits are the
    full forward's, and the cache is written in place (no re-allocation)."""
    model = tiny_model_nonzero_b("chtsl")
    ids = random_ids(2, 14, seed=9)
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    for backend in ("dense", "sparse"):
        rt = from_packed(pack_model(model), backend)
        cache = rt.new_cache(2, 16)
        pointers = [t.data_ptr() for t in cache.key]
        torch.testing.assert_close(rt.decode_step(ids[:, :8], cache), reference[:, 7], atol=ATOL, rtol=0)
        torch.testing.assert_close(rt.decode_step(ids[:, 8:11], cache), reference[:, 10], atol=ATOL, rtol=0)
        for t in range(11, 14):
            out = torch.empty(2, rt.config.vocab_size)
            assert rt.decode_step(ids[:, t:t + 1], cache, out=out).data_ptr() == out.data_ptr()
            torch.testing.assert_close(out, reference[:, t], atol=ATOL, rtol=0)
        assert cache.length == 14 and [t.data_ptr() for t in cache.key] == pointers
        with pytest.raises(ValueError, match="do not fit"):
            rt.decode_step(ids[:, :3], cache)  # 14 + 3 > 16


def test_decode_steps_of_up_to_four_tokens_take_the_c_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of ≤ 4 tokens after a prefill (two sequences × 2, one × 3) run the C decode glue and the
    groups' bound kernels, and still give the full forward's logits."""
    calls = []
    real = kernels.attention_decode
    monkeypatch.setattr(kernels, "attention_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_blocks = kernels.DecodeLayers.__call__  # the sparse backend runs all blocks in one C call
    monkeypatch.setattr(kernels.DecodeLayers, "__call__",
                        lambda self, *a: calls.extend([1] * len(self.blocks)) or real_blocks(self, *a))
    model = tiny_model_nonzero_b("chtsl", num_key_value_heads=2)
    ids = random_ids(2, 12, seed=4)
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    for backend in ("dense", "sparse"):
        rt = from_packed(pack_model(model), backend)
        cache = rt.new_cache(2, 12)
        rt.decode_step(ids[:, :7], cache)  # 14 tokens: the torch path
        assert not calls
        torch.testing.assert_close(rt.decode_step(ids[:, 7:9], cache), reference[:, 8], atol=ATOL, rtol=0)
        assert len(calls) == rt.config.num_hidden_layers
        single = rt.new_cache(1, 12)
        rt.decode_step(ids[:1, :5], single)
        torch.testing.assert_close(rt.decode_step(ids[:1, 5:8], single), reference[:1, 7], atol=ATOL, rtol=0)
        groups = [m for m in rt.model.modules() if isinstance(m, FusedLinears)]
        assert all(g.decoder() is not None for g in groups)
        calls.clear()


@pytest.mark.parametrize("item_bytes", [KernelSettings().decode_item_bytes, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_blocks_in_one_c_call_equal_the_block_loop(dtype: torch.dtype, item_bytes: int,
                                                       monkeypatch: pytest.MonkeyPatch, kernel_variant: str) -> None:
    """`kernels.DecodeLayers` (every block of a ≤ 4-token step in one C call) gives the logits and the
    KV cache of feature_major's block loop over the same kernels exactly, for 1, 2 and 3 tokens per
    sequence (3: the sparse kernel's tile path) with GQA; it is rebuilt after `.to()`, and models it
    does not cover (a dense base weight) keep the loop. 64-byte work items: the tiny groups split
    into dozens of items, which the threads take from each other's runs."""
    from chtsl_infer.runtime import feature_major

    model = tiny_model_nonzero_b("chtsl", num_key_value_heads=2)
    ids = random_ids(2, 14, seed=6)
    real = feature_major._decode_layers
    rt = from_packed(pack_model(model), "sparse", dtype=dtype)
    assert_one_call_equals_the_block_loop(rt, ids, monkeypatch, item_bytes)
    first = real(rt.model, dtype)
    assert first is not None and real(rt.model, dtype) is first  # built once
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32
    rt.model.to(other)
    again = real(rt.model, other)
    assert again is not None and again is not first and again.dtype == other
    norm = rt.model.model.layers[0].input_layernorm
    norm.weight.data = norm.weight.data.clone()  # same Parameter, new memory: the C table's pointer is stale
    assert real(rt.model, other) is not again
    dense = from_packed(pack_model(model), "dense", dtype=dtype)
    assert real(dense.model, dtype) is None


def test_the_one_call_decoder_follows_the_build_in_force() -> None:
    """The kept `DecodeLayers` is bound to the kernel build in force when it was made: inside
    `build.use_library(another)` it is rebuilt on that build, and again on the first after the block."""
    from chtsl_infer.kernels import build
    from chtsl_infer.runtime import feature_major

    base = build.library()[0]
    if base is None:
        pytest.skip("no compiled kernels")
    rt = from_packed(pack_model(tiny_model_nonzero_b("chtsl")), "sparse")
    first = feature_major._decode_layers(rt.model, torch.float32)
    assert first is not None and first.fn is build.current().functions["decode_layers"]
    other = base if build.current() is not base else None
    if other is None:  # the base build is in force: take any build variant this CPU has, or a plain copy
        from chtsl_infer.kernels.table import BUILD_VARIANTS

        names = [n for n, spec in BUILD_VARIANTS.items() if spec.applies(base.probed())]
        if not names:
            pytest.skip("no build variant applies to this CPU")
        other, why = build.variant_library(names[0])
        assert other is not None, why
    with build.use_library(other):
        inside = feature_major._decode_layers(rt.model, torch.float32)
        assert inside is not first and inside.fn is other.functions["decode_layers"]
    after = feature_major._decode_layers(rt.model, torch.float32)
    assert after is not inside and after.fn is build.current().functions["decode_layers"]


def test_generate_stops_at_eos_and_pads_finished_sequences() -> None:
    model = tiny_model_nonzero_b("chtsl")
    rt = from_packed(pack_model(model), "sparse")
    prompt = random_ids(2, 5, seed=2)
    free = rt.generate(prompt, max_new_tokens=10)
    eos = int(free[0, 7])  # the first sequence's third new token
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=10, do_sample=False, temperature=None, top_p=None,
                              top_k=None, eos_token_id=eos, pad_token_id=eos)
    got = rt.generate(prompt, max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(got, want)


def test_random_packed_has_the_configured_links_and_saves_memory() -> None:
    config = tiny_config("chtsl")
    packed = random_packed(config, seed=1)
    skeleton = ChtslLlamaForCausalLM(config)
    for name, layer in skeleton.chtsl_layers().items():
        lin = packed.linears[name]
        assert lin.nnz == layer_link_count(layer.out_features, layer.in_features, layer.sparsity, layer.group_rows)
        assert lin.lora_A.shape == layer.lora_A.shape and lin.lora_B.shape == layer.lora_B.shape
    sparse = from_packed(packed, "sparse")
    dense_model = from_packed(random_packed(tiny_config("dense")), "dense")
    assert sparse.model_bytes < 0.75 * dense_model.model_bytes
    assert torch.isfinite(sparse.logits(random_ids(1, 8))).all()


def test_resolve_backend_rules_and_errors() -> None:
    cpu = torch.device("cpu")
    assert resolve_backend("auto", random_packed(tiny_config("chtsl")), cpu) == "sparse"
    assert resolve_backend("auto", random_packed(tiny_config("dense")), cpu) == "dense"
    assert resolve_backend("auto", random_packed(tiny_config("cola")), cpu) == "dense"
    assert resolve_backend("dense", None, cpu) == "dense"
    with pytest.raises(ChtslError, match="unknown backend 'fast'"):
        resolve_backend("fast", None, cpu)


def test_load_runtime_from_checkpoint_and_packed_export(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = ChtslLlamaForCausalLM.from_pretrained(tiny_checkpoint).eval()
    model.use_chtsl_runtime = False  # the reference: transformers' forward
    ids = random_ids(2, 11, vocab=model.config.vocab_size)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_packed(pack_model(model), tmp_path / "model.safetensors")
    for path in (tiny_checkpoint, tmp_path):
        for backend in ("auto", "sparse", "dense"):
            torch.testing.assert_close(load_runtime(path, backend).logits(ids), want, atol=ATOL, rtol=0)


def test_bad_input_is_a_user_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ChtslError, match="run `chtsl export"):
        load_runtime(tiny_checkpoint, "onnx")
    with pytest.raises(ChtslError, match="not found"):
        load_runtime(tmp_path / "missing", "dense")
    with pytest.raises(ChtslError, match="float32"):
        from_packed(random_packed(tiny_config()), "sparse", dtype=torch.float16)
    with pytest.raises(ChtslError, match="needs an export directory"):
        from_packed(random_packed(tiny_config()), "onnx")


def test_tied_embeddings_share_storage() -> None:
    model = tiny_model_nonzero_b("chtsl", tie_word_embeddings=True)
    rt = from_packed(pack_model(model), "sparse")
    assert rt.model.lm_head.weight.data_ptr() == rt.model.model.embed_tokens.weight.data_ptr()
    ids = random_ids(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(rt.logits(ids), model(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_torch_csr_group_on_cpu_tensors() -> None:
    """A fused group holding S as the CUDA path does (one int32 `torch.sparse_csr_tensor` over the
    stacked members, `spmm_cuda`), built on CPU: same output as the dense group, memory counted."""
    from chtsl_infer.runtime.backends import resident_bytes

    packed = pack_model(tiny_model_nonzero_b("chtsl"))
    names = [f"model.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj")]
    linears = [packed.linears[n] for n in names]
    cpu = torch.device("cpu")
    group = FusedLinears(linears, sparse=True, device=cpu, dtype=torch.float32, torch_csr=True)
    dense = FusedLinears(linears, sparse=False, device=cpu, dtype=torch.float32)
    csr = group.cuda_csr
    assert csr is not None and not hasattr(group, "crow")  # no CPU-kernel buffers
    assert csr.crow_indices().dtype == csr.col_indices().dtype == torch.int32
    assert csr.shape == (sum(group.outs), group.in_features) and csr.values().numel() == sum(lin.nnz for lin in linears)
    x = torch.randn(group.in_features, 23, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(group.forward_fm(x), dense.forward_fm(x), atol=ATOL, rtol=0)
    csr_bytes = sum(t.numel() * t.element_size() for t in (csr.crow_indices(), csr.col_indices(), csr.values()))
    lowrank = sum(b.numel() * b.element_size() for b in group.buffers())
    assert resident_bytes(group) == csr_bytes + lowrank
    half = FusedLinears(linears, sparse=True, device=cpu, dtype=torch.bfloat16, torch_csr=True)
    assert half.cuda_csr.values().dtype == half.lora_A.dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["chtsl", "chts", "dense"])
def test_bfloat16_cpu_backends_within_1e2_of_fp32(method: str) -> None:
    """--dtype bfloat16 on CPU: bf16 weights and activations (sparse: the bf16 kernel, fp32 sums);
    ‖Δlogits‖/‖logits‖ ≤ 1e-2 vs fp32, for full forwards and for KV-cache decoding steps."""
    model = tiny_model_nonzero_b(method)
    ids = random_ids(2, 21)
    reference = from_packed(pack_model(model), "dense").logits(ids)
    for backend in ("sparse", "dense"):
        rt = from_packed(pack_model(model), backend, dtype=torch.bfloat16)
        if backend == "sparse" and method != "dense":
            group = rt.model.model.layers[0].self_attn.q_proj.group
            assert group.values.dtype == torch.bfloat16 and rt.model.lm_head.weight.dtype == torch.bfloat16
        got = rt.logits(ids)
        assert got.dtype == torch.bfloat16
        rel = torch.linalg.vector_norm(got.float() - reference) / torch.linalg.vector_norm(reference)
        assert rel <= 1e-2, (backend, float(rel))
        cache = rt.new_cache(2, 21)
        steps = [rt.decode_step(ids[:, :18], cache)] + [rt.decode_step(ids[:, t:t + 1], cache) for t in range(18, 21)]
        got = torch.stack(steps[:-1], dim=1).float()
        want = reference[:, 17:20]
        assert torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want) <= 1e-2, backend
        assert all(g.decoder() is not None for g in rt.model.modules() if isinstance(g, FusedLinears))  # bf16 kernels
