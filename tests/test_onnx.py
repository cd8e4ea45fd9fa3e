"""ONNX export (export/onnx.py): sparse weights, full checker, ONNX Runtime vs PyTorch, file size."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from chtsl_infer.model.modeling import ChtslLlamaForCausalLM
from chtsl_infer.model.presets import build_config
from chtsl_infer.runtime.backends import OnnxCache
from export.onnx import (
    EXPORT_SHAPE,
    check_onnx,
    export_graph,
    export_onnx,
    providers,
    save_onnx,
    session,
    sparsify_initializers,
)
from export.verify import (
    DECODE_STEPS,
    TOL_ONNX,
    VERIFY_SHAPES,
    cached_batch,
    random_batches,
    reference_logits,
    verify_onnx,
    verify_onnx_cached,
)
from tests.conftest import tiny_model

assert all(shape != EXPORT_SHAPE for shape in VERIFY_SHAPES)


def sparse_tensors(proto: onnx.ModelProto) -> list[onnx.SparseTensorProto]:
    """The sparse tensors of a graph: Constant `sparse_value`s and `sparse_initializer`s."""
    consts = [a.sparse_tensor for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute
              if a.name == "sparse_value"]
    return consts + list(proto.graph.sparse_initializer)


def ort_logits(path: Path, ids: torch.Tensor, provider: str = "CPUExecutionProvider") -> np.ndarray:
    """Full-sequence logits from the cached graph: an empty past (past_seq = 0), as Optimum's first call."""
    sess = session(path, provider)
    return OnnxCache.empty(sess, ids.shape[0]).run(sess, ids).numpy()


@functools.cache
def exported(method: str) -> tuple[ChtslLlamaForCausalLM, onnx.ModelProto]:
    """A tiny model of `method` (one explicit zero on every mask) and its dense exported graph,
    built once per test session; tests sparsify deep copies of the graph."""
    model = tiny_model(method)
    with torch.no_grad():  # a zero on the mask (a just-regrown link) must stay an entry
        for layer in model.sparse_layers().values():
            r, c = layer.mask.nonzero()[0]
            layer.weight[r, c] = 0.0
    return model, export_graph(model)


@pytest.mark.slow  # ONNX export per method
@pytest.mark.parametrize("method", ["chtsl", "sltrain", "cola", "dense"])
def test_onnx_matches_pytorch_on_unseen_shapes(method: str, tmp_path: Path) -> None:
    model, dense = exported(method)
    proto = copy.deepcopy(dense)
    stats = sparsify_initializers(proto, model)  # sparse_as="constant", the default
    path = tmp_path / "model.onnx"
    save_onnx(proto, path)
    check_onnx(path, full_check=True)

    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    # Optimum's Llama decoder signature: names, dtypes and (batch, kv_heads, past_seq, head_dim) caches.
    cfg = model.config
    layers_n, head_dim = cfg.num_hidden_layers, cfg.hidden_size // cfg.num_attention_heads
    past = [f"past_key_values.{i}.{kv}" for i in range(layers_n) for kv in ("key", "value")]
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask", "position_ids", *past]
    assert [o.name for o in proto.graph.output] == ["logits", *[p.replace("past_key_values", "present") for p in past]]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*proto.graph.input, *proto.graph.output]}
    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]}
    assert types["input_ids"] == types["attention_mask"] == types["position_ids"] == onnx.TensorProto.INT64
    assert types["past_key_values.0.key"] == types["present.0.key"] == onnx.TensorProto.FLOAT
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert dims["past_key_values.0.key"] == ["batch_size", cfg.num_key_value_heads, "past_sequence_length", head_dim]
    assert dims["present.1.value"] == ["batch_size", cfg.num_key_value_heads, "past_sequence_length + sequence_length",
                                       head_dim]
    assert dims["logits"] == ["batch_size", "sequence_length", cfg.vocab_size]

    # One COO sparse tensor (int64 indices) per sparse branch, holding exactly the mask's links.
    sparse = sparse_tensors(proto)
    layers = model.sparse_layers()
    assert len(sparse) == len(layers) == stats.n_sparse
    assert all(t.indices.data_type == onnx.TensorProto.INT64 for t in sparse)
    assert sorted(t.values.dims[0] for t in sparse) == sorted(int(m.mask.sum()) for m in layers.values())
    assert stats.nnz == sum(int(m.mask.sum()) for m in layers.values())
    assert not stats.unmatched_layers
    if layers:  # the sparse form is what makes the file small
        assert path.stat().st_size < dense.ByteSize() - 0.5 * stats.dense_linear_bytes

    batches = random_batches(model.config.vocab_size, seed=3)
    refs = reference_logits(model, batches)
    for ids, ref in zip(batches, refs, strict=True):
        out = ort_logits(path, ids)
        assert out.shape == tuple(ref.shape)
        assert np.abs(out - ref.numpy()).max() <= TOL_ONNX
    checks = verify_onnx(path, batches, refs)  # every available provider (CUDA when present)
    assert checks and all(c.ok for c in checks)
    assert {c.runtime for c in checks} == {f"ORT {p.removesuffix('ExecutionProvider')}" for p in providers()}
    ids = cached_batch(model.config.vocab_size)
    cached = verify_onnx_cached(path, ids, reference_logits(model, [ids])[0])
    assert [c.phase for c in cached] == ["prefill", f"{DECODE_STEPS} cached steps"] * len(providers())
    assert all(c.ok for c in cached), cached


@pytest.mark.slow  # ONNX export with a KV cache
def test_onnx_cache_with_left_padding_and_grouped_query_attention(tmp_path: Path) -> None:
    """GQA (2 kv heads for 4 query heads) and a left-padded prompt driven as onnxruntime users do:
    attention_mask 0 on the padding, positions counted from the first real token."""
    from export.onnx import past_names

    model = tiny_model("chtsl", num_key_value_heads=2)
    path = tmp_path / "model.onnx"
    export_onnx(model, path)
    sess = session(path)
    ids = random_batches(model.config.vocab_size, ((1, 9),), seed=8)[0]
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits[0, -1].numpy()
    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids[:, :6]], dim=1)
    mask = np.array([[0] * pad + [1] * 6], dtype=np.int64)
    positions = np.array([[0] * pad + list(range(6))], dtype=np.int64)
    kv, hd = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    past = {n: np.zeros((1, kv, 0, hd), np.float32) for n in past_names(model.config.num_hidden_layers)}
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, {"input_ids": padded.numpy(), "attention_mask": mask, "position_ids": positions, **past})
    for t in range(6, 9):
        past = {n.replace("present", "past_key_values"): v for n, v in zip(names, outs, strict=True) if n != "logits"}
        mask = np.concatenate([mask, [[1]]], axis=1)
        outs = sess.run(names, {"input_ids": ids[:, t:t + 1].numpy(), "attention_mask": mask,
                                "position_ids": np.array([[t]]), **past})
    assert outs[names.index("present.0.key")].shape == (1, kv, pad + 9, hd)
    assert np.abs(outs[0][0, -1] - ref).max() <= TOL_ONNX


@pytest.mark.slow  # exports and runs an ONNX graph
def test_sparse_initializer_layout_runs_in_onnxruntime(tmp_path: Path) -> None:
    """`graph.sparse_initializer` form: the basic checker passes and ORT densifies it correctly;
    onnx's strict shape inference (full_check) types it as a sparse tensor, which MatMul rejects."""
    model, dense = exported("chtsl")
    proto = copy.deepcopy(dense)
    stats = sparsify_initializers(proto, model, sparse_as="initializer")
    assert len(proto.graph.sparse_initializer) == len(model.sparse_layers()) == stats.n_sparse
    # Only the sparse-branch initializers moved; everything else stayed dense.
    assert len(proto.graph.initializer) == len(dense.graph.initializer) - stats.n_sparse
    path = tmp_path / "model.onnx"
    save_onnx(proto, path)
    check_onnx(path, full_check=False)
    with pytest.raises(Exception, match="(?i)sparse|rank"):
        check_onnx(path, full_check=True)
    ids = random_batches(model.config.vocab_size, seed=4)[1]
    ref = reference_logits(model, [ids])[0].numpy()
    assert np.abs(ort_logits(path, ids) - ref).max() <= TOL_ONNX


@pytest.mark.slow  # traces the model with the ONNX exporter before the error
def test_unmatched_sparse_weights_are_an_error() -> None:
    model, dense = exported("chtsl")
    other = tiny_model("chtsl", seed=6)  # different weights: nothing in `dense` belongs to it
    stats = sparsify_initializers(copy.deepcopy(dense), other)
    assert stats.n_sparse == 0 and len(stats.unmatched_layers) == len(other.sparse_layers())


def test_opset_below_18_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="opset"):
        export_onnx(tiny_model("chtsl"), tmp_path / "m.onnx", opset=16)


@pytest.mark.slow  # 60M shapes
def test_llama60m_shapes_onnx_linears_within_025_of_dense(tmp_path: Path) -> None:
    """llama60m-c4 shapes (s=0.95, r=16, random, fp32): CHTsL linears ≤ 0.25× the dense bytes.

    One of the eight blocks, to keep the test fast (a full 60M export takes ~25 s on 2 cores);
    every block has the same shapes, so the linear-byte ratio does not depend on the count.
    """
    config = build_config("llama60m-c4", s_total=0.9, num_hidden_layers=1)
    assert config.chtsl["sparsity"]["q_proj"] == 0.95 and config.chtsl["rank"]["q_proj"] == 16
    torch.manual_seed(0)
    model = ChtslLlamaForCausalLM(config).eval()
    stats = export_onnx(model, tmp_path / "model.onnx")
    assert stats.dense_linear_bytes == sum(4 * m.in_features * m.out_features for m in model.chtsl_layers().values())
    ratio = stats.linear_bytes / stats.dense_linear_bytes
    file_ratio = stats.file_bytes / stats.dense_equivalent_bytes
    print(f"llama60m-c4 (1 block) ONNX fp32: linears {ratio:.4f}x, file {file_ratio:.4f}x")
    assert ratio <= 0.25
    assert stats.factor_bytes >= 4 * sum(m.lora_A.numel() + m.lora_B.numel() for m in model.chtsl_layers().values())
    ids = random_batches(config.vocab_size, shapes=((1, 6),), seed=1)[0]
    ref = reference_logits(model, [ids])[0].numpy()
    assert np.abs(ort_logits(tmp_path / "model.onnx", ids) - ref).max() <= TOL_ONNX
