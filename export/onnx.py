"""ONNX export: a Llama decoder graph with a KV cache, in the names and layout Optimum uses, float32.

Inputs (i = 0 … layers-1)
  input_ids                       int64   [batch, seq]
  attention_mask                  int64   [batch, past_seq + seq]
  position_ids                    int64   [batch, seq]
  past_key_values.{i}.key/value   float32 [batch, kv_heads, past_seq, head_dim]
Outputs
  logits                          float32 [batch, seq, vocab]
  present.{i}.key/value           float32 [batch, kv_heads, past_seq + seq, head_dim]

So onnxruntime users drive it like any exported Llama: the first call passes past tensors with
past_seq = 0 (and the prompt), every later call the previous call's `present` tensors as `past`,
the new token(s), a mask of ones over past + new positions (0 on left padding) and their
positions. Keys are stored after RoPE, as transformers does. Causality is over cache index:
query i (at cache index past_seq + i) sees keys 0 … past_seq + i that the mask allows.

The graph comes from `torch.onnx.export` (the dynamo exporter) of `CachedDecoder`: the model's
own embedding, RMSNorms, linears and lm_head with the attention written out in plain ops (the
cache as tensors in and out, not a transformers `Cache` object). Before export each sparse
branch is materialised as one plain weight `S = weight · mask`, so it becomes a single MatMul
initializer (the exporter folds the transpose: the initializer holds Sᵀ). Afterwards the `onnx`
API finds those initializers by content — the exporter renames them — and replaces each by an
ONNX `SparseTensorProto` (COO: float values + int64 linearised indices, as the spec requires),
which ONNX Runtime densifies at load. The low-rank branch stays MatMul → activation → MatMul.

Where the sparse tensors live (`sparse_as`):
  "constant"     (default) a `Constant` node with a `sparse_value` attribute per weight. Its
                 output is typed as a dense tensor, so the graph passes
                 `onnx.checker.check_model(full_check=True)`; ONNX Runtime turns such constants
                 into (sparse) initializers when it loads the graph.
  "initializer"  `graph.sparse_initializer`. ONNX's shape inference types these as sparse
                 tensors, which MatMul does not accept, so only the basic checker passes
                 (full_check fails on onnx ≤ 1.23); ONNX Runtime runs it all the same.
Both store exactly the same bytes.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from chtsl_infer.model.modeling import ChtslLlamaForCausalLM

# The dynamo exporter emits opset 18 and converts to other versions afterwards; the conversion down
# to 17 fails on this graph (ReduceMean's axes input) and leaves the model at 18, so 18 is the
# lowest opset we can produce. Versions above 18 convert fine (checked: 20, 21, 23).
MIN_OPSET = 18
DEFAULT_OPSET = 18
EXPORT_SHAPE = (2, 8)  # (batch, seq) of the example input; verification uses other shapes
EXPORT_PAST = 5  # past_seq of the example input (not 0 or 1, which the exporter would specialise on)
PROTOBUF_LIMIT = 2**31 - 1  # bytes; larger models are saved with external data
SPARSE_AS = ("constant", "initializer")


def past_names(n_layers: int) -> list[str]:
    """`past_key_values.{i}.key`, `….value` for every block, in the graph's input order."""
    return [f"past_key_values.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    """`present.{i}.key`, `….value` for every block, in the graph's output order."""
    return [f"present.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


class CachedDecoder(nn.Module):
    """The exported signature (module docstring): (input_ids, attention_mask, position_ids, *past)
    → (logits, *present), with past/present interleaved key, value per block.

    Same arithmetic as transformers' Llama (RMSNorm, RoPE by `position_ids`, softmax attention with
    `head_dim**-0.5`, GQA by repeating kv heads); masked scores get the dtype's lowest value rather
    than -inf, so a fully masked (left-padding) row gives finite garbage, not NaN.
    """

    def __init__(self, model: ChtslLlamaForCausalLM) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        inner = self.model.model
        batch, seq = input_ids.shape
        past_len = past[0].shape[2]
        h = inner.embed_tokens(input_ids)  # (batch, seq, hidden)
        cos, sin = inner.rotary_emb(h, position_ids)
        key_index = torch.arange(past_len + seq, device=h.device)
        query_index = torch.arange(seq, device=h.device) + past_len
        allowed = (key_index[None, :] <= query_index[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        bias = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill(
            ~allowed, torch.finfo(h.dtype).min)  # (batch, 1, seq, past_seq + seq)
        presents: list[torch.Tensor] = []
        groups = self.n_heads // self.n_kv
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, seq, self.n_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, seq, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + bias
            o = torch.matmul(torch.softmax(scores, dim=-1), v)  # (batch, heads, seq, head_dim)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.model.lm_head(inner.norm(h))
        return (logits, *presents)


def example_inputs(config, batch: int = EXPORT_SHAPE[0], seq: int = EXPORT_SHAPE[1],
                   past: int = EXPORT_PAST) -> tuple[torch.Tensor, ...]:  # config: ChtslConfig
    """(input_ids, attention_mask, position_ids, *past) of the given sizes (zeros, ones, positions)."""
    n_kv = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = [torch.zeros(batch, n_kv, past, head_dim) for _ in range(2 * config.num_hidden_layers)]
    return (ids, mask, positions, *cache)


@dataclass
class OnnxStats:
    """Bytes of the exported graph's tensors (all float32), split by what they are."""

    file_bytes: int = 0
    sparse_bytes: int = 0  # sparse initializers of the sparse branches: values + int64 indices
    factor_bytes: int = 0  # low-rank factors A, B (and the full weights of method `dense`)
    dense_linear_bytes: int = 0  # what the block linears would take as dense float32 matrices
    other_bytes: int = 0  # every other initializer (embeddings, norms, lm_head, constants)
    n_sparse: int = 0  # sparse initializers written
    nnz: int = 0
    unmatched_layers: list[str] = field(default_factory=list)

    @property
    def linear_bytes(self) -> int:
        """Bytes of the CHTsL linears in the file (sparse initializers + factors)."""
        return self.sparse_bytes + self.factor_bytes

    @property
    def dense_equivalent_bytes(self) -> int:
        """File size if the block linears were stored as dense float32 matrices."""
        return self.file_bytes - self.linear_bytes + self.dense_linear_bytes


def _digest(array: np.ndarray) -> tuple[tuple[int, ...], str]:
    """(shape, content hash) identifying a float32 array."""
    a = np.ascontiguousarray(array, dtype=np.float32)
    return a.shape, hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


@dataclass
class _Part:
    """A tensor of one CHTsL linear as it may appear among the exported initializers."""

    layer: str
    kind: str  # "sparse" (S), "factor" (lora_A / lora_B / dense weight)
    mask: np.ndarray | None  # bool support in the same orientation (sparse parts only)


def _parts_index(model: ChtslLlamaForCausalLM) -> dict[tuple[tuple[int, ...], str], list[_Part]]:
    """Content digest → parts, for every block linear tensor in both orientations (W and Wᵀ)."""
    index: dict[tuple[tuple[int, ...], str], list[_Part]] = {}
    for name, layer in model.chtsl_layers().items():
        tensors: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        if layer.mask is not None:
            tensors.append(("sparse", layer.sparse_weight(), layer.mask))
        elif layer.weight is not None:
            tensors.append(("factor", layer.weight, None))
        if layer.has_lowrank:
            tensors += [("factor", layer.lora_A, None), ("factor", layer.lora_B, None)]
        for kind, t, mask in tensors:
            w = t.detach().float().cpu().numpy()
            m = None if mask is None else mask.cpu().numpy()
            for arr, msk in ((w, m), (w.T, None if m is None else m.T)):
                index.setdefault(_digest(arr), []).append(_Part(name, kind, None if msk is None else msk.copy()))
    return index


def materialized_copy(model: ChtslLlamaForCausalLM) -> ChtslLlamaForCausalLM:
    """A float32 copy whose sparse branches are plain weights `S = weight·mask` (mask dropped).

    With no mask, `SparseLowRankLinear.sparse_weight()` returns the weight itself, so every S is one
    initializer of the graph instead of weight, mask and a Mul.
    """
    export = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for layer in export.sparse_layers().values():
            layer.weight.mul_(layer.mask)
            layer.mask = None
    export.config.use_cache = False
    return export


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silences the exporter's optional-dependency warnings (torchvision ops) and onnxscript's
    version-converter log (a traceback when an opset cannot be reached; we raise our own error)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration",
                                              "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR if lg.name != "onnxscript" else logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_graph(model: ChtslLlamaForCausalLM, opset: int = DEFAULT_OPSET):  # -> onnx.ModelProto
    """The dense ONNX graph of `model` (float32, dynamic batch/seq/past axes, KV cache in and out)."""
    import warnings

    export = materialized_copy(model)
    n_layers = export.config.num_hidden_layers
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past_seq")
    cache_dims = {0: batch, 2: past}
    dynamic = (
        {0: batch, 1: seq}, {0: batch, 1: torch.export.Dim.AUTO}, {0: batch, 1: seq},
        tuple([cache_dims] * (2 * n_layers)),  # *past: one entry for the varargs
    )
    with _quiet_exporter(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            CachedDecoder(export),
            example_inputs(export.config),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names(n_layers)],
            output_names=["logits", *present_names(n_layers)],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic,
            verbose=False,
            optimize=True,
        )
    proto = program.model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ValueError(f"the exporter produced opset {got}, not the requested {opset}")
    _name_dims(proto)
    return proto


def _name_dims(proto) -> None:
    """Names the graph's symbolic dims as Optimum does (batch_size, sequence_length, past_sequence_length,
    past_sequence_length + sequence_length) instead of the exporter's s0, s1 …"""
    names = {"input_ids": ("batch_size", "sequence_length"), "position_ids": ("batch_size", "sequence_length"),
             "attention_mask": ("batch_size", "past_sequence_length + sequence_length"),
             "logits": ("batch_size", "sequence_length", None)}
    for value in [*proto.graph.input, *proto.graph.output]:
        if value.name.startswith("past_key_values."):
            want = ("batch_size", None, "past_sequence_length", None)
        elif value.name.startswith("present."):
            want = ("batch_size", None, "past_sequence_length + sequence_length", None)
        else:
            want = names.get(value.name, ())
        for dim, name in zip(value.type.tensor_type.shape.dim, want, strict=False):
            if name is not None and dim.HasField("dim_param"):
                dim.dim_param = name


def sparsify_initializers(proto, model: ChtslLlamaForCausalLM, sparse_as: str = "constant") -> OnnxStats:
    """Replaces every sparse-branch initializer of `proto` (onnx.ModelProto) by a sparse tensor, in place.

    Initializers are matched to the model's tensors by content (the exporter renames and
    transposes them). A match is converted only when all its non-zeros lie on the layer's mask,
    so the densified graph is exactly the dense one; explicit zeros on the mask are kept as
    entries (nnz = mask count). `sparse_as`: "constant" or "initializer" (module docstring).
    Returns the byte accounting of the result (`file_bytes` is filled in by `export_onnx`).
    """
    from onnx import helper, numpy_helper

    if sparse_as not in SPARSE_AS:
        raise ValueError(f"sparse_as must be one of {', '.join(SPARSE_AS)}, got {sparse_as!r}")
    index = _parts_index(model)
    stats = OnnxStats()
    stats.dense_linear_bytes = sum(4 * m.in_features * m.out_features for m in model.chtsl_layers().values())
    matched: set[str] = set()
    keep, sparse = [], []
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        parts = index.get(_digest(arr)) if arr.dtype == np.float32 and arr.ndim == 2 else None
        part = parts[0] if parts else None
        if part is not None and part.kind == "sparse":
            assert part.mask is not None
            if not np.any(arr[~part.mask]):
                flat = np.flatnonzero(part.mask).astype(np.int64)  # ascending, row-major (linearised)
                values = numpy_helper.from_array(arr.reshape(-1)[flat].astype(np.float32), name=init.name)
                indices = numpy_helper.from_array(flat, name=f"{init.name}_indices")
                sparse.append(helper.make_sparse_tensor(values, indices, list(arr.shape)))
                stats.sparse_bytes += values.ByteSize() + indices.ByteSize()
                stats.nnz += flat.size
                matched.update(p.layer for p in parts if p.kind == "sparse")
                continue
        if part is not None and part.kind == "factor":
            stats.factor_bytes += init.ByteSize()
        else:
            stats.other_bytes += init.ByteSize()
        keep.append(init)
    stats.n_sparse = len(sparse)
    stats.unmatched_layers = sorted(set(model.sparse_layers()) - matched)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    names = {t.values.name for t in sparse}
    # The exporter records the dense type of every initializer in value_info; a sparse
    # initializer's type is inferred as a sparse tensor and would clash with it.
    value_info = [v for v in proto.graph.value_info if v.name not in names]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(value_info)
    if sparse_as == "initializer":
        proto.graph.sparse_initializer.extend(sparse)
    else:
        constants = [helper.make_node("Constant", [], [t.values.name], name=f"sparse/{t.values.name}",
                                      sparse_value=t) for t in sparse]
        nodes = constants + list(proto.graph.node)  # constants first: the graph stays topologically sorted
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    return stats


def save_onnx(proto, path: Path) -> None:
    """Saves `proto` to `path`, with external data beside it when it exceeds protobuf's 2 GB."""
    import onnx

    if proto.ByteSize() > PROTOBUF_LIMIT:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data")
    else:
        onnx.save_model(proto, str(path))


def check_onnx(path: Path, full_check: bool = True) -> None:
    """`onnx.checker.check_model` (by path, so external data works); raises onnx's errors."""
    import onnx

    onnx.checker.check_model(str(path), full_check=full_check)


def export_onnx(
    model: ChtslLlamaForCausalLM, path: str | Path, opset: int = DEFAULT_OPSET, sparse_as: str = "constant",
    stage: Callable[[str], AbstractContextManager] = lambda name: nullcontext(),
) -> OnnxStats:
    """Exports `model` to `path` (.onnx) with sparse weights, checks it; returns byte stats.

    The checker runs with `full_check` for `sparse_as="constant"` and without it for
    "initializer" (see the module docstring). Raises ValueError for an opset below `MIN_OPSET` or
    one the exporter cannot produce, RuntimeError when a sparse branch could not be located in the
    exported graph (the file would silently be dense). `stage(name)` wraps each of the three
    stages (`chtsl export` shows them as progress).
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    path = Path(path)
    with stage("export ONNX graph"):
        proto = export_graph(model, opset)
    with stage("sparsify ONNX weights"):
        stats = sparsify_initializers(proto, model, sparse_as)
        if stats.unmatched_layers:
            raise RuntimeError(
                f"{len(stats.unmatched_layers)} sparse weights not found among the ONNX initializers "
                f"(first: {stats.unmatched_layers[0]})"
            )
        save_onnx(proto, path)
        del proto
    with stage("check ONNX (full_check)"):
        check_onnx(path, full_check=sparse_as == "constant")
    data = path.with_name(f"{path.name}.data")
    stats.file_bytes = os.path.getsize(path) + (os.path.getsize(data) if data.exists() else 0)
    return stats


def providers() -> list[str]:
    """ONNX Runtime execution providers to verify with: CPU, plus CUDA when it is available."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else [])


def session(path: str | Path, provider: str = "CPUExecutionProvider"):  # -> ort.InferenceSession
    """An ONNX Runtime session on `provider` (CUDA with TF32 off, so fp32 tolerances hold)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    if provider == "CUDAExecutionProvider":
        chosen: list = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    else:
        chosen = [provider]
    return ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
