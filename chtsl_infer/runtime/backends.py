"""Inference backends: the transformers Llama with its CHTsL linears replaced by inference modules.

Each decoder block's seven linears become four `FusedLinears` groups (`fused.py`) — (q, k, v), (o),
(gate, up), (down) — because linears of one group read the same input: one call computes every
member at once (one sparse kernel over the concatenated CSR rows, one GEMM with the concatenated A
factors).
`Runtime.logits` (scoring, bench, perplexity) and `Runtime.generate` / `decode_step` (a
preallocated KV cache) run the blocks feature-major (`feature_major.py`), calling each group
directly; transformers' own forward (`runtime.model(...)`) still works, each member returning its
slice of the group's output.

Per group, `y = S x + scale · B σ(A x)`:
  S x        `dense`: S densified once at load, one GEMM (the reference); method `dense` always so;
             `sparse`: CSR kernel (`kernels.spmm_cpu`, compiled C, on CPU; cuSPARSE on CUDA);
  B σ(A x)   two skinny GEMMs, `A` concatenated over the group, one `B` per member (BA is never formed).
`onnx` runs onnxruntime on an exported `model.onnx` (`chtsl export --format onnx`).
`auto` picks by rule, backed by `benchmarks/model.py` on 2 CPU cores: `sparse` on CPU when the
model has a sparse branch of density ≤ `AUTO_SPARSE_MAX_DENSITY` and the C kernel built (its
torch-CSR fallback loses to MKL), else `dense`; `dense` on CUDA (no GPU measurement yet).

The model is built from a `PackedModel` on the `meta` device and filled with the packed tensors, so
a dense S is never materialised by the `sparse` backend (resident memory is the packed size).
"""

from __future__ import annotations

import ctypes
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chtsl_infer import kernels
from chtsl_infer.errors import ChtslError, first_line
from chtsl_infer.formats.encoding import dequantize_rows
from chtsl_infer.formats.model_dir import ModelDir, load_model, load_packed, resolve_model_dir
from chtsl_infer.formats.packed import PackedLinear, PackedModel, convert_packed, pack_model
from chtsl_infer.model.configuration import ChtslConfig
from chtsl_infer.model.layers import random_mask
from chtsl_infer.model.modeling import ChtslLlamaForCausalLM
from chtsl_infer.runtime import feature_major
from chtsl_infer.runtime.fused import (
    DENSE_PATHS,
    FusedLinears,
    FusedMember,
    dense_fm,
    set_dense_path,
    use_int8_activations,
)
from chtsl_infer.runtime.int8 import Int8Linear
from chtsl_infer.utils import warn_once

BACKENDS = ("auto", "dense", "sparse", "onnx")
AUTO_SPARSE_MAX_DENSITY = 0.3  # at 30 % the C kernel is still 1.1–1.5× dense (60M shapes); margin for other CPUs
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))


def check_backend_dtype(backend: str, device: str, dtype: str) -> None:
    """Raises ChtslError where `backend` cannot compute in `dtype` ("fp32", "bf16", "fp16", or "int8": int8
    weights with fp32 activations) on `device`."""
    if backend in ("sparse", "auto") and device == "cpu" and dtype == "fp16":
        raise ChtslError("backend 'sparse' on CPU computes in float32 or bfloat16; use --dtype fp32|bf16")
    if backend == "onnx" and dtype != "fp32":
        raise ChtslError("backend 'onnx' runs the exported float32 graph; use --dtype fp32")
    if dtype == "int8" and device != "cpu":
        raise ChtslError(f"--dtype int8 (int8 weights, fp32 activations) runs on CPU, not {device}; "
                         f"use --dtype bf16|fp32 there")


def check_int8_activations(backend: str, device: str, dtype: str) -> None:
    """Raises ChtslError where `--int8-activations` cannot apply: it needs int8 weights ("int8") on the
    CPU sparse backend (or `auto`, which must then resolve to it)."""
    if dtype != "int8" or device != "cpu" or backend not in ("sparse", "auto"):
        raise ChtslError(f"--int8-activations needs int8 weights (--dtype int8, or an int8 export) on the CPU "
                         f"sparse backend; this run has --dtype {dtype}, --backend {backend} on {device}")


def runtime_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
    """(the activations' dtype, the weights' packed dtype or None: as stored) of a runtime `dtype`: int8
    means int8 weights (quantized in memory where they are not) under fp32 activations."""
    return (torch.float32, torch.int8) if dtype == torch.int8 else (dtype, None)


def resolve_backend(backend: str, packed: PackedModel | None, device: torch.device) -> str:
    """The concrete backend for `backend` (`auto` resolved); ChtslError when unknown/unavailable."""
    if backend not in BACKENDS:
        raise ChtslError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type != "cpu" or packed is None or not kernels.cpu_kernel_status()[0]:
        return "dense"  # without the compiled kernel, torch's CSR fallback loses to MKL
    densities = [lin.nnz / (lin.in_features * lin.out_features) for lin in packed.linears.values() if lin.has_sparse]
    return "sparse" if densities and max(densities) <= AUTO_SPARSE_MAX_DENSITY else "dense"


@torch.no_grad()
def build_model(packed: PackedModel, backend: str = "dense", device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, consume: bool = False) -> ChtslLlamaForCausalLM:
    """The inference model of `packed` with `backend` ('dense' or 'sparse'), in eval mode.

    Built on `meta` and filled from the packed tensors: nothing of the training form is allocated.
    `consume`: empty `packed` while building, so its copy of every tensor is freed as soon as the
    model's exists (peak memory ≈ the model, not model + packed).
    """
    device = torch.device(device)
    if backend not in ("dense", "sparse"):
        raise ValueError(f"build_model builds the torch backends dense/sparse, not {backend!r}")
    config: ChtslConfig = packed.config
    # An int8 model keeps its int8 weights where the int8 kernels run them: the sparse backend on CPU with
    # fp32 activations; its untied embedding stays in its (bf16) float dtype, read a row at a time.
    # Elsewhere (the dense reference, CUDA, bf16) every weight is dequantized into `dtype`.
    int8 = packed.dtype == torch.int8 and backend == "sparse" and device.type == "cpu" and dtype == torch.float32
    with torch.device("meta"):
        model = ChtslLlamaForCausalLM(config)
    for i, block in enumerate(model.model.layers):
        for parent_name, members in GROUPS:
            parent = getattr(block, parent_name)
            names = [f"model.layers.{i}.{parent_name}.{m}" for m in members]
            linears = [packed.linears.pop(n) if consume else packed.linears[n] for n in names]
            group = FusedLinears(linears, sparse=backend == "sparse", device=device, dtype=dtype, int8=int8)
            del linears
            for j, m in enumerate(members):
                setattr(parent, m, FusedMember(group, j, owner=j == 0))
    head, head_scale = packed.dense.get("lm_head.weight"), packed.dense.get("lm_head.weight_scale")
    keep_embedding = int8 and not config.tie_word_embeddings
    dense = {k: (v.to(device) if not v.is_floating_point() or keep_embedding and k == "model.embed_tokens.weight"
                 else v.to(device, dtype))
             for k, v in packed.dense.items() if not k.startswith("lm_head.")}
    if consume:
        packed.dense.clear()
    if head is not None:  # int8: kept (`Int8Linear`) or dequantized; float: cast
        if head_scale is not None and int8:
            model.lm_head = Int8Linear(head.to(device), head_scale.to(device))
        else:
            dense["lm_head.weight"] = (head if head_scale is None else dequantize_rows(head, head_scale)).to(
                device, dtype)
    _, unexpected = model.load_state_dict(dense, strict=False, assign=True)
    if unexpected:
        raise ChtslError(f"packed model does not match its config: unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.device(device):  # RoPE frequencies are non-persistent buffers: recompute them
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ChtslError(f"packed model does not match its config: missing {left[:3]}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of `model`, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for m in model.modules():  # cuSPARSE tensors are plain attributes, not buffers
        csr = getattr(m, "cuda_csr", None)
        if isinstance(csr, torch.Tensor):
            total += sum(t.numel() * t.element_size() for t in (csr.crow_indices(), csr.col_indices(), csr.values()))
    return total


# ----------------------------------------------------------------------------- random weights


@torch.no_grad()
def random_packed(config: ChtslConfig, seed: int = 0) -> PackedModel:
    """A packed model of `config` with random weights at its sparsity, built layer by layer.

    For benchmarks ("dummy weights" as in the paper): S on a uniformly random support with
    N(0, 0.02²) values, A and B N(0, σ0²), embeddings and lm_head N(0, 0.02²), norms 1. Only one
    layer's mask is ever dense in memory, so building it costs about the packed size.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        skeleton = ChtslLlamaForCausalLM(config)
    layers = skeleton.chtsl_layers()
    linears: dict[str, PackedLinear] = {}
    for name, layer in layers.items():
        out_f, in_f = layer.out_features, layer.in_features
        lin = PackedLinear(name=name, in_features=in_f, out_features=out_f, scale=float(layer.scale),
                           activation=layer.activation)
        if layer.has_sparse:
            mask = random_mask(out_f, in_f, layer.sparsity, layer.group_rows, generator=gen)
            rows, cols = mask.nonzero(as_tuple=True)
            crow = torch.zeros(out_f + 1, dtype=torch.int64)
            crow[1:] = mask.sum(1).cumsum(0)
            lin.crow_indices = crow.to(torch.int32)
            lin.col_indices = cols.to(torch.int16 if in_f <= 32767 else torch.int32)
            lin.values = torch.randn(rows.numel(), generator=gen) * config.initializer_range
        elif layer.weight is not None:
            lin.weight = torch.randn(out_f, in_f, generator=gen) * config.initializer_range
        if layer.has_lowrank:
            sigma = (layer.rank * (in_f + out_f)) ** -0.25
            lin.lora_A = torch.randn(layer.rank, in_f, generator=gen) * sigma
            lin.lora_B = torch.randn(out_f, layer.rank, generator=gen) * sigma
        linears[name] = lin
    dense: dict[str, torch.Tensor] = {}
    for key, t in skeleton.state_dict().items():
        if key.rsplit(".", 1)[0] in layers or (config.tie_word_embeddings and key == "lm_head.weight"):
            continue
        if key.endswith("norm.weight") or "layernorm" in key:
            dense[key] = torch.ones(t.shape)
        else:
            dense[key] = torch.randn(t.shape, generator=gen) * config.initializer_range
    return PackedModel(config=config, dtype=torch.float32, linears=linears, dense=dense)


# ----------------------------------------------------------------------------- one interface


@dataclass
class Runtime:
    """A loaded model behind one interface: `logits(input_ids)` and `generate(...)`.

    `model` is set for the torch backends (`dense`, `sparse`), `session` for `onnx`.
    """

    backend: str
    device: torch.device
    dtype: torch.dtype
    config: ChtslConfig
    model: ChtslLlamaForCausalLM | None = None
    session: Any = None  # onnxruntime.InferenceSession
    model_bytes: int = 0
    int8_activations: bool = False  # the int8 products round their inputs to int8 (`from_packed`)
    workspace: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # reused activation buffers

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (batch, seq) int64 -> logits (batch, seq, vocab), no KV cache.

        `out`: a (batch, seq, vocab) tensor of the runtime's dtype and device to write the logits
        into, e.g. one buffer reused by a serving or benchmark loop (saves re-faulting its pages).
        """
        if self.session is not None:
            if OnnxCache.has_cache(self.session):  # a graph with past_key_values: start from an empty cache
                logits = OnnxCache.empty(self.session, input_ids.shape[0]).run(self.session, input_ids.cpu())
            else:
                logits = torch.from_numpy(self.session.run(["logits"], {"input_ids": input_ids.cpu().numpy()})[0])
            return logits if out is None else out.copy_(logits)
        assert self.model is not None
        return feature_major.logits(self.model, input_ids.to(self.device), out=out, workspace=self.workspace)

    def new_cache(self, batch: int, capacity: int) -> Any:
        """An empty KV cache for `batch` sequences of up to `capacity` tokens (see `decode_step`).

        Torch backends: a preallocated `feature_major.KVCache`; `onnx`: an `OnnxCache` (the graph's
        `past_key_values` tensors), or None for a graph exported without a cache.
        """
        if capacity > self.config.max_position_embeddings:
            raise ChtslError(f"{capacity} positions exceed the model's {self.config.max_position_embeddings}")
        if self.session is not None:
            return OnnxCache.empty(self.session, batch) if OnnxCache.has_cache(self.session) else None
        assert self.model is not None
        return feature_major.new_cache(self.model, batch, capacity)

    @torch.no_grad()
    def decode_step(self, input_ids: torch.Tensor, cache: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        """Feeds input_ids (batch, seq) after the cached tokens: the last position's logits (batch, vocab).

        seq is the prompt's length at prefill, 1 per decoded token. The cache advances by seq.
        `cache` None (an ONNX graph without a cache): `input_ids` must be the whole sequence so far.
        """
        if self.session is not None:
            if cache is None:
                last = self.logits(input_ids)[:, -1]
            else:
                last = cache.run(self.session, input_ids.cpu())[:, -1]
            return last if out is None else out.copy_(last)
        assert self.model is not None
        return feature_major.forward(self.model, input_ids.to(self.device), cache=cache, last_only=True, out=out,
                                     workspace=self.workspace)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 streamer: Any = None, eos_token_id: int | None = None) -> torch.Tensor:
        """(batch, prompt) -> (batch, prompt + new) tokens; greedy when temperature is 0, else sampled.

        One prefill, then one `decode_step` per token with a KV cache (preallocated for the torch
        backends; the graph's `past_key_values` for `onnx`). Greedy output is transformers'
        `generate()`'s, token for token. With `eos_token_id`, a finished sequence continues with
        eos (transformers' padding, pad = eos) and decoding stops once every sequence has finished.
        """
        ids = input_ids.to(self.device)
        batch, prompt = ids.shape
        if streamer is not None:
            streamer.put(ids.cpu())
        cache = self.new_cache(batch, prompt + max_new_tokens)
        out = torch.empty(batch, prompt + max_new_tokens, dtype=ids.dtype, device=self.device)
        out[:, :prompt] = ids
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        feed = ids
        length = prompt
        for _ in range(max_new_tokens):
            last = self.decode_step(feed if cache is not None else out[:, :length], cache).float().to(self.device)
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(last / temperature, dim=-1), 1)
            else:
                nxt = last.argmax(-1, keepdim=True)
            if eos_token_id is not None:
                nxt = nxt.masked_fill_(done[:, None], eos_token_id)
                done |= nxt[:, 0] == eos_token_id
            out[:, length:length + 1] = nxt
            length += 1
            feed = nxt
            if streamer is not None:
                streamer.put(nxt.cpu())
            if eos_token_id is not None and bool(done.all()):
                break
        if streamer is not None:
            streamer.end()
        return out[:, :length].cpu()


@dataclass
class OnnxCache:
    """The KV cache of an ONNX graph exported with `past_key_values` inputs (`export.onnx`).

    `past`: the graph's `past_key_values.{i}.key/value` feeds, (batch, kv_heads, length, head_dim)
    float32 arrays — the previous call's `present` outputs; onnxruntime allocates new ones each
    call (the graph concatenates), as with any Optimum-exported decoder.
    """

    past: dict[str, Any]
    batch: int
    length: int = 0

    @staticmethod
    def has_cache(session: Any) -> bool:
        """Whether the session's graph takes `past_key_values` (older exports take input_ids only)."""
        return any(i.name.startswith("past_key_values.") for i in session.get_inputs())

    @classmethod
    def empty(cls, session: Any, batch: int) -> OnnxCache:
        """Zero-length past tensors for `batch` sequences, shaped from the graph's input types."""
        import numpy as np

        past = {}
        for i in session.get_inputs():
            if i.name.startswith("past_key_values."):
                _, kv_heads, _, head_dim = i.shape
                past[i.name] = np.zeros((batch, kv_heads, 0, head_dim), dtype=np.float32)
        return cls(past, batch)

    def run(self, session: Any, input_ids: torch.Tensor) -> torch.Tensor:
        """Feeds input_ids (batch, seq) after the cached positions: logits (batch, seq, vocab); advances."""
        import numpy as np

        batch, seq = input_ids.shape
        if batch != self.batch:
            raise ValueError(f"a cache of {self.batch} sequences was fed {batch}")
        positions = np.arange(self.length, self.length + seq, dtype=np.int64)
        feeds = {"input_ids": input_ids.numpy().astype(np.int64, copy=False),
                 "attention_mask": np.ones((batch, self.length + seq), dtype=np.int64),
                 "position_ids": np.ascontiguousarray(np.broadcast_to(positions, (batch, seq))), **self.past}
        names = [o.name for o in session.get_outputs()]
        outputs = session.run(names, feeds)
        self.past = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(names, outputs, strict=True)
                     if n.startswith("present.")}
        self.length += seq
        return torch.from_numpy(outputs[names.index("logits")])


def from_packed(packed: PackedModel, backend: str = "auto", device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, consume: bool = False,
                int8_activations: bool = False) -> Runtime:
    """A torch-backend `Runtime` of an in-memory packed model (`onnx` needs a file: `load_runtime`).

    `dtype`: what the model computes in; torch.int8 = int8 weights (`packed` quantized in memory where
    it is not int8) with fp32 activations, the runtime's dtype then float32 (`runtime_dtypes`).
    `consume`: `packed` is emptied while the model is built (see `build_model`). `int8_activations`:
    the int8 products (sparse, low-rank, an int8 lm_head) also round their inputs to int8
    (`fused.use_int8_activations`; int8 weights on the CPU sparse backend, else ChtslError).
    """
    device = torch.device(device)
    dtype, weights = runtime_dtypes(dtype)
    if weights is not None and device.type != "cpu":
        raise ChtslError(f"int8 weights run on CPU, not {device}")
    if weights is not None and packed.dtype != weights:
        packed = convert_packed(packed, weights)
    backend = resolve_backend(backend, packed, device)
    if backend == "onnx":
        raise ChtslError("backend 'onnx' needs an export directory with model.onnx "
                        "(run `chtsl export CKPT --format onnx`)")
    if backend == "sparse" and device.type == "cpu" and dtype not in (torch.float32, torch.bfloat16):
        raise ChtslError("backend 'sparse' on CPU computes in float32 or bfloat16; use --dtype fp32|bf16 "
                         "or --backend dense")
    if int8_activations and not (weights == torch.int8 and backend == "sparse"):  # before the (long) build
        raise ChtslError(f"int8 activations need int8 weights on the CPU sparse backend (here backend {backend})")
    model = build_model(packed, backend, device, dtype, consume=consume)
    if int8_activations and not use_int8_activations(model):
        raise ChtslError(f"int8 activations apply to the sparse products of the compiled CPU kernels: this model has "
                         f"none ({packed.config.method} method; kernels: {kernels.cpu_kernel_status()[1]})")
    if int8_activations and not kernels.kernel_info().a8_vector:
        warn_once("int8 activations: the kernels were built without AVX-512 VBMI and VNNI, so their plain-C loops "
                  "run (the same results, slower than int8 weights alone)")
    if device.type == "cpu":  # after the build: its freed packed tensors go back to the OS
        keep_freed_heap()
    return Runtime(backend=backend, device=device, dtype=dtype, config=packed.config, model=model,
                   model_bytes=resident_bytes(model), int8_activations=int8_activations)


def keep_freed_heap() -> bool:
    """Returns the memory freed so far to the OS, then makes glibc keep later freed memory for
    reuse instead of returning it; True if set.

    A forward allocates and frees the same activations every call. By default glibc serves the
    large ones with fresh mmaps (and trims the heap top above a threshold), so every call faults
    them in again, page by page: measured on 2 cores, llama60m-c4 at batch 128 × seq 32 spends
    ~30 % of its forward in page faults (RoPE alone 190 ms instead of 46 ms). Allocations up to
    glibc's 32 MiB mmap limit then come from the heap, whose free top is kept up to 2 GiB; larger
    ones (logits, the gate/up buffer) are reused via `Runtime.logits(out=...)` and the workspace.
    Process-wide; called once the model is built, after `malloc_trim`, so the build's garbage
    (119 MiB of freed-but-resident heap after building a random 60M CHTsL model) is not kept.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.malloc_trim(0)
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_trim_threshold, 2**31 - 1) and libc.mallopt(m_mmap_threshold, 32 << 20))


def load_packed_any(path: str | Path | ModelDir) -> PackedModel:
    """The packed form of a packed export dir or of a training checkpoint dir (packed in memory)."""
    model_dir = resolve_model_dir(path).require_weights()
    if model_dir.kind == "packed":
        return load_packed(model_dir.weights)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI shows its own progress; keep stderr to errors
    model = load_model(model_dir)
    packed = pack_model(model, torch.float32)
    del model
    return packed


def load_runtime(path: str | Path | ModelDir, backend: str = "auto", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, int8_activations: bool = False) -> Runtime:
    """The `Runtime` of a checkpoint or export directory with `backend`, computing in `dtype` (an export's
    weights are cast to it, int8 ones dequantized; torch.int8: int8 weights, fp32 activations; with
    `int8_activations` the int8 products' inputs int8 too, see `from_packed`)."""
    model_dir = resolve_model_dir(path)
    device = torch.device(device)
    if backend == "onnx":
        return _onnx_runtime(model_dir, device, dtype)
    packed = load_packed_any(model_dir)
    return from_packed(packed, backend, device, dtype, consume=True, int8_activations=int8_activations)


def _onnx_runtime(model_dir: ModelDir, device: torch.device, dtype: torch.dtype) -> Runtime:
    """onnxruntime on `<dir>/model.onnx` (CUDA provider on a CUDA device)."""
    onnx_file = model_dir.require_onnx()
    try:
        import onnxruntime as ort
    except ImportError:
        raise ChtslError("backend 'onnx' needs onnxruntime (pip install onnxruntime)") from None
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ChtslError("backend 'onnx' on cuda needs onnxruntime-gpu (CUDAExecutionProvider is not available)")
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    ort.set_default_logger_severity(4)  # its own log lines would precede our one-line error
    try:
        session = ort.InferenceSession(str(onnx_file), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... for bad bytes
        raise ChtslError(f"{onnx_file}: not a loadable ONNX model ({first_line(e)})") from None
    return Runtime(backend="onnx", device=device, dtype=dtype, config=model_dir.config(), session=session,
                   model_bytes=onnx_file.stat().st_size)


__all__ = ["BACKENDS", "DENSE_PATHS", "Runtime", "build_model", "check_backend_dtype", "check_int8_activations",
           "dense_fm", "from_packed", "load_packed_any", "load_runtime", "random_packed", "resident_bytes",
           "resolve_backend", "set_dense_path", "use_int8_activations"]
