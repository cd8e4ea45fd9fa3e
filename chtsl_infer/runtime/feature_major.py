"""Forward of a runtime model with activations kept feature-major: full sequences and KV-cache decoding.

`Runtime.logits` (scoring, perplexity, `chtsl bench`) and `Runtime.generate` / `chtsl bench --mode
decode` run the decoder here instead of through transformers' modules. Activations are (features,
tokens) — hidden states (H, T) with T = batch × seq — because the sparse kernel computes `S X`
with X's rows contiguous: in this layout neither its input nor its output needs a transpose
(token-major, torch's two transposes take 4–11× as long as the kernel itself: 4096 tokens, 60M
shapes). Dense GEMMs, RMSNorm, RoPE and SiLU·mul do not care about the layout; attention gets
(batch, heads, seq, head_dim) copies of q/k/v and its output is copied back once per block. Both
torch backends use this path, so the `dense` reference and `sparse` differ only in how `S X` is
computed.

Decoding (`KVCache`, `forward(..., cache=...)`) is the same block loop with a preallocated cache:
each call writes its keys/values at the cache's current length (no per-token re-allocation,
unlike a cache grown by concatenation), attends to the cache's first `length + seq` positions, and
computes logits for the last position of each sequence only (a (batch, vocab) GEMV per token
instead of (batch × seq, vocab) at prefill). One decoded token is a (H, batch) activation, so the
sparse kernel takes its per-token gather path (`KernelSettings.token_tile`). Up to `kernels.GEMV_MAX_TOKENS`
tokens on CPU (fp32 or bf16), the operations between the linears — RMSNorm, RoPE with the cache
write and attention, SiLU·mul — run as one C call each (`csrc/decode.c`) and every fused group
through its bound kernels (`FusedLinears.decoder`): as ~30 torch operations per block they cost a
quarter of a llama1b decoding step. Where every group's base is sparse or absent (the `sparse`
backend) the whole block loop is one C call (`kernels.DecodeLayers`, the same kernels in the same
order, equal to the loop bit for bit): the loop's ~14 Python calls per block, slowed by the caches
the weights stream through, still took 1/6 of a llama1b token (interleaved: 98.6 -> 81.9 ms).

Same arithmetic as transformers' Llama (`LlamaRMSNorm`, `apply_rotary_pos_emb`, SDPA with
`head_dim**-0.5`, causal, GQA, `act(gate) * up`); tests compare the logits within 1e-4 and greedy
decoding token-for-token with transformers' `generate()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation

from chtsl_infer import kernels
from chtsl_infer.kernels import build
from chtsl_infer.model.modeling import ChtslLlamaForCausalLM
from chtsl_infer.runtime.fused import FusedLinears
from chtsl_infer.runtime.int8 import int8_mm

SILU = (nn.SiLU, SiLUActivation)  # transformers' Llama MLP holds its own SiLU module (ACT2FN["silu"])


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm over the feature dim: h (H, T) -> (H, T)."""
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(0, keepdim=True) + eps)
    return weight[:, None] * hf.to(h.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (heads, head_dim, batch, seq) with cos/sin (head_dim, 1, seq)."""
    half = x.shape[1] // 2
    rotated = torch.cat((-x[:, half:], x[:, :half]), dim=1)
    return x * cos + rotated * sin


def _head_dims(cfg) -> tuple[int, int, int]:  # cfg: ChtslConfig
    """(attention heads, key/value heads, head_dim) of a config."""
    n_heads = cfg.num_attention_heads
    return n_heads, cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads


def rope_tables(model: ChtslLlamaForCausalLM, positions: torch.Tensor,
                like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (head_dim, 1, len(positions)) of the model's RoPE, in `like`'s dtype.

    Per position the values are those transformers computes (an outer product, so one position's
    entries do not depend on which other positions are in the table).
    """
    cos, sin = model.model.rotary_emb(like, positions[None])  # (1, n, head_dim) each
    return cos[0].t().contiguous()[:, None], sin[0].t().contiguous()[:, None]


@dataclass
class KVCache:
    """Preallocated keys/values of every block: `key[i]`, `value[i]` (batch, kv_heads, capacity, head_dim).

    The layout of transformers' and Optimum's Llama caches. Positions `[0, length)` are filled;
    `forward` writes the next ones in place. `cos`/`sin` (head_dim, 1, capacity): the RoPE tables of
    every position the cache can hold, computed once.
    """

    key: list[torch.Tensor]
    value: list[torch.Tensor]
    cos: torch.Tensor
    sin: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.key[0].shape[2]

    @property
    def batch(self) -> int:
        return self.key[0].shape[0]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.key, *self.value))


@torch.no_grad()
def new_cache(model: ChtslLlamaForCausalLM, batch: int, capacity: int) -> KVCache:
    """An empty `KVCache` for `batch` sequences of up to `capacity` tokens, on the model's device/dtype."""
    cfg = model.config
    _, n_kv, head_dim = _head_dims(cfg)
    if capacity > cfg.max_position_embeddings:
        raise ValueError(f"cache of {capacity} positions exceeds the model's {cfg.max_position_embeddings}")
    like = model.model.norm.weight  # the compute dtype (an int8 model's embedding stays bf16)
    shape = (batch, n_kv, capacity, head_dim)
    keys = [like.new_empty(shape) for _ in range(cfg.num_hidden_layers)]
    values = [like.new_empty(shape) for _ in range(cfg.num_hidden_layers)]
    cos, sin = rope_tables(model, torch.arange(capacity, device=like.device), like)
    return KVCache(keys, values, cos, sin)


@torch.no_grad()
def logits(model: ChtslLlamaForCausalLM, input_ids: torch.Tensor, out: torch.Tensor | None = None,
           workspace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """input_ids (batch, seq) -> logits (batch, seq, vocab) of a runtime-built model, no KV cache.

    `out`: a contiguous (batch, seq, vocab) tensor the logits are written into. `workspace`: a dict
    kept by the caller across calls, holding the (2·ffn, T) gate/up buffer. Both avoid allocations
    above glibc's mmap threshold (32 MiB), which are unmapped when freed and fault in again, page
    by page, on the next call (about 0.2 ms per MiB here: 100 ms for 4096 × 32000 logits).
    """
    return forward(model, input_ids, out=out, workspace=workspace)


@torch.no_grad()
def forward(model: ChtslLlamaForCausalLM, input_ids: torch.Tensor, cache: KVCache | None = None,
            last_only: bool = False, out: torch.Tensor | None = None,
            workspace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """input_ids (batch, seq) -> logits (batch, seq, vocab), or (batch, vocab) with `last_only`.

    `cache`: the sequences' `KVCache`; the tokens are positions `cache.length …` of each sequence,
    their keys/values are written there and `cache.length` advances by seq. Without one, positions
    start at 0 and nothing is kept. `out`, `workspace`: see `logits`.
    """
    cfg = model.config
    inner = model.model
    batch, seq = input_ids.shape
    n_tok = batch * seq
    n_heads, n_kv, head_dim = _head_dims(cfg)
    q_rows = n_heads * head_dim
    start = 0 if cache is None else cache.length
    end = start + seq
    if cache is not None and (end > cache.capacity or batch != cache.batch):
        raise ValueError(f"{batch}×{seq} tokens at position {start} do not fit a cache of "
                         f"{cache.batch}×{cache.capacity}")

    # (H, T) in the compute dtype (the norms'): an int8 model keeps its embedding in bf16, rows widened here
    h = inner.embed_tokens(input_ids).view(n_tok, -1).t().to(inner.norm.weight.dtype).contiguous()
    if cache is None:
        cos, sin = rope_tables(model, torch.arange(seq, device=input_ids.device), h)
    else:
        cos, sin = cache.cos[:, :, start:end], cache.sin[:, :, start:end]
    mask = None
    if cache is not None and start > 0 and seq > 1:  # a chunk after cached tokens: causal with an offset
        mask = torch.ones(seq, end, dtype=torch.bool, device=h.device).tril_(start)
    # A few tokens with a cache (decoding): the glue between the linears in C, one call each (csrc/decode.c),
    # or the whole block loop in one call where every group qualifies (_decode_layers).
    glue = (cache is not None and n_tok <= kernels.GEMV_MAX_TOKENS
            and kernels.decode_kernels_serve(h, cache.key[0], cache.cos, inner.norm.weight))
    blocks = _decode_layers(model, h.dtype) if glue else None
    if blocks is not None:  # every block in one C call
        assert cache is not None
        blocks(h, cache.key, cache.value, cache.cos, cache.sin, start, batch, seq, n_heads,
               inner.layers[0].self_attn.scaling)
    for i, layer in enumerate(inner.layers if blocks is None else ()):
        attn, mlp = layer.self_attn, layer.mlp
        x = _norm(glue, h, layer.input_layernorm)
        qkv = attn.q_proj.group.forward_fm(x)  # (q_rows + 2 kv_rows, T)
        del x
        if glue:
            assert cache is not None
            o = kernels.attention_decode(qkv, cache.key[i], cache.value[i], cache.cos, cache.sin, start, seq,
                                         n_heads, attn.scaling, h.new_empty(q_rows, n_tok))
        else:
            o = _attention(qkv, cos, sin, cache, i, start, end, mask, batch, seq, (n_heads, n_kv, head_dim),
                           attn.scaling)
        del qkv
        h += attn.o_proj.group.forward_fm(o)
        del o
        x = _norm(glue, h, layer.post_attention_layernorm)
        group = mlp.gate_proj.group
        gate_up = group.forward_fm(x, out=_buffer(workspace, "gate_up", (group.offsets[-1], n_tok), h))  # (2·ffn, T)
        del x
        ffn = gate_up.shape[0] // 2
        if glue and isinstance(mlp.act_fn, SILU):
            act = kernels.silu_mul_fm(gate_up)
        elif isinstance(mlp.act_fn, SILU):  # in place: no (ffn, T) allocation
            act = F.silu(gate_up[:ffn], inplace=True).mul_(gate_up[ffn:])
        else:
            act = mlp.act_fn(gate_up[:ffn]).mul_(gate_up[ffn:])
        h += mlp.down_proj.group.forward_fm(act)
        del act
    if cache is not None:
        cache.length = end
    weight = model.lm_head.weight
    scale = getattr(model.lm_head, "weight_scale", None)  # an int8 lm_head's row scales (runtime.int8.Int8Linear)
    a8 = getattr(model.lm_head, "int8_activations", False)  # and its input rounded to int8 (int8 activations)
    if last_only:  # logits of each sequence's last position only: (H, batch)
        h = _norm(glue, h.view(-1, batch, seq)[:, :, -1], inner.norm)
        if out is None:
            out = h.new_empty(batch, weight.shape[0])
        # One row per sequence: a memory-bound GEMV, ~2.5x torch's on CPU (kernels.dense_gemv).
        if kernels.dense_gemv(weight, h.t(), out, scale=scale, int8_activations=a8):
            return out
        if scale is not None:
            return int8_mm(weight, scale, h, out=out.t(), int8_activations=a8).t()
        return torch.mm(h.t(), weight.t(), out=out)
    h = rms_norm(h, inner.norm.weight, inner.norm.variance_epsilon)
    if out is None:
        out = h.new_empty(batch, seq, weight.shape[0])
    if scale is not None:  # (vocab, T) written through the transposed view of the (T, vocab) logits
        int8_mm(weight, scale, h, out=out.view(n_tok, -1).t(), int8_activations=a8)
    else:
        torch.mm(h.t(), weight.t(), out=out.view(n_tok, -1))  # reads h transposed: no copy
    return out


def _decode_layers(model: ChtslLlamaForCausalLM, dtype: torch.dtype) -> kernels.DecodeLayers | None:
    """The model's blocks as one `kernels.DecodeLayers` call, or None where a block does not qualify
    (a group without its decode kernels or with a dense base weight, an MLP activation other than SiLU,
    norms of another dtype). Built once and kept on the model while its blocks, the groups' decoders
    and the norm weights stay the same objects at the same addresses (`.to()` replaces them) and the
    kernel build in force is the one it was bound to (`build.use_library` may put another in force).

    The check runs every decoding step, so it reads plain attributes: walking the blocks through
    `nn.Module.__getattr__` cost 0.9 ms per llama1b token."""
    layers = model.model.layers
    kept: _KeptDecodeLayers | None = model.__dict__.get("_chtsl_decode_layers")
    if kept is not None and kept.still_valid(layers, dtype):
        return kept.blocks
    groups = [g for layer in layers for g in (layer.self_attn.q_proj.group, layer.self_attn.o_proj.group,
                                              layer.mlp.gate_proj.group, layer.mlp.down_proj.group)]
    decoders = [g.decoder() for g in groups]
    modules = [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms = [n.weight for n in modules]
    eps = {n.variance_epsilon for n in modules}
    fits = (len(eps) == 1 and all(d is not None and g._decoder_dtype == dtype and g.weight is None
                                  for g, d in zip(groups, decoders, strict=True))
            and all(isinstance(layer.mlp.act_fn, SILU) for layer in layers)
            and all(n.dtype == dtype and n.is_contiguous() for n in norms))
    blocks = None
    if fits:
        blocks = kernels.DecodeLayers(
            [(norms[2 * i], norms[2 * i + 1], decoders[4 * i:4 * i + 4]) for i in range(len(layers))],
            eps.pop(), layers[0].mlp.gate_proj.group.offsets[-1] // 2, dtype)
    model.__dict__["_chtsl_decode_layers"] = _KeptDecodeLayers(
        blocks, list(layers), groups, [g._decoder for g in groups], list(zip(modules, norms, strict=True)),
        [w.data_ptr() for w in norms], dtype, build.current())
    return blocks


@dataclass
class _KeptDecodeLayers:
    """What `_decode_layers` built (blocks: None if the model does not qualify) and the objects it was
    built from; it holds them, so identity checks cannot be fooled by a reused id."""

    blocks: kernels.DecodeLayers | None
    layers: list[nn.Module]
    groups: list[FusedLinears]
    decoders: list[kernels.GroupDecoder | None]
    norms: list[tuple[nn.Module, torch.Tensor]]  # (norm module, its weight Parameter)
    norm_ptrs: list[int]
    dtype: torch.dtype
    library: build.Library | None  # the build in force when the blocks were bound

    def still_valid(self, layers: nn.ModuleList, dtype: torch.dtype) -> bool:
        return (self.dtype == dtype and build.current() is self.library and len(self.layers) == len(layers)
                and all(a is b for a, b in zip(self.layers, layers, strict=True))
                and all(g._decoder is d for g, d in zip(self.groups, self.decoders, strict=True))
                and all(m._parameters["weight"] is w and w.data_ptr() == p
                        for (m, w), p in zip(self.norms, self.norm_ptrs, strict=True)))


def _norm(glue: bool, h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """A LlamaRMSNorm module applied to feature-major h (H, T): the C kernel where `glue` (decoding), else torch."""
    if not glue:
        return rms_norm(h, norm.weight, norm.variance_epsilon)
    return kernels.rms_norm_fm(h, norm.weight, norm.variance_epsilon, torch.empty_like(h))


def _attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, i: int, start: int,
               end: int, mask: torch.Tensor | None, batch: int, seq: int, heads: tuple[int, int, int],
               scale: float) -> torch.Tensor:
    """Block i's attention with torch: qkv (q_rows + 2 kv_rows, T) -> (q_rows, T), RoPE applied, the
    new keys/values written into `cache` at [start, end) when there is one. heads: (heads, kv heads, head_dim)."""
    n_heads, n_kv, head_dim = heads
    q_rows, kv_rows = n_heads * head_dim, n_kv * head_dim
    # (batch, heads, seq, head_dim) copies: SDPA's fused CPU kernel needs contiguous head rows
    # (on strided views it falls back to the unfused math path, ≈ 1.6× slower here).
    q = rotate(qkv[:q_rows].view(n_heads, head_dim, batch, seq), cos, sin).permute(2, 0, 3, 1).contiguous()
    k = rotate(qkv[q_rows:q_rows + kv_rows].view(n_kv, head_dim, batch, seq), cos, sin).permute(2, 0, 3, 1)
    v = qkv[q_rows + kv_rows:].view(n_kv, head_dim, batch, seq).permute(2, 0, 3, 1)
    if cache is None:
        k, v = k.contiguous(), v.contiguous()
    else:  # into the preallocated cache; attend to everything cached so far
        cache.key[i][:, :, start:end] = k
        cache.value[i][:, :, start:end] = v
        if start > 0:
            k, v = cache.key[i][:, :, :end], cache.value[i][:, :, :end]
        else:
            k, v = k.contiguous(), v.contiguous()
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1,
                                       scale=scale, enable_gqa=n_kv != n_heads)
    return o.permute(1, 3, 0, 2).reshape(q_rows, batch * seq)  # back to (heads·head_dim, T)


def _buffer(workspace: dict[str, torch.Tensor] | None, name: str, shape: tuple[int, ...],
            like: torch.Tensor) -> torch.Tensor | None:
    """workspace[name] when it has `shape` (re-allocated when not); None without a workspace."""
    if workspace is None:
        return None
    buf = workspace.get(name)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        workspace.pop(name, None)  # free the old one first: peak = one buffer
        buf = workspace[name] = like.new_empty(shape)
    return buf
