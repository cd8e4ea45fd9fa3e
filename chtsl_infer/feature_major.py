"""Full-sequence forward of a runtime model with activations kept feature-major.

`Runtime.logits` (scoring, perplexity, `chtsl bench`) runs the decoder here instead of through
transformers' modules. Activations are (features, tokens) — hidden states (H, T) with T = batch ×
seq — because the sparse kernel computes `S X` with X's rows contiguous: in this layout neither
its input nor its output needs a transpose (token-major, torch's two transposes take 4–11× as
long as the kernel itself: 4096 tokens, 60M shapes). Dense GEMMs, RMSNorm, RoPE and SiLU·mul do
not care about the layout; attention gets (batch, heads, seq, head_dim) copies of q/k/v and its
output is copied back once per block. Both torch backends use this path, so the `dense`
reference and `sparse` differ only in how `S X` is computed.

Same arithmetic as transformers' Llama (`LlamaRMSNorm`, `apply_rotary_pos_emb`, SDPA with
`head_dim**-0.5`, causal, GQA, `act(gate) * up`); tests compare the logits within 1e-4.
The KV-cache path (`generate`) stays transformers' own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chtsl_infer.modeling import ChtslLlamaForCausalLM


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


@torch.no_grad()
def logits(model: ChtslLlamaForCausalLM, input_ids: torch.Tensor, out: torch.Tensor | None = None,
           workspace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """input_ids (batch, seq) -> logits (batch, seq, vocab) of a runtime-built model, no KV cache.

    `out`: a contiguous (batch, seq, vocab) tensor the logits are written into. `workspace`: a dict
    kept by the caller across calls, holding the (2·ffn, T) gate/up buffer. Both avoid allocations
    above glibc's mmap threshold (32 MiB), which are unmapped when freed and fault in again, page
    by page, on the next call (about 0.2 ms per MiB here: 100 ms for 4096 × 32000 logits).
    """
    cfg = model.config
    inner = model.model
    batch, seq = input_ids.shape
    n_tok = batch * seq
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    q_rows, kv_rows = n_heads * head_dim, n_kv * head_dim

    h = inner.embed_tokens(input_ids).view(n_tok, -1).t().contiguous()  # (H, T)
    positions = torch.arange(seq, device=input_ids.device)[None]
    cos, sin = inner.rotary_emb(h, positions)  # (1, seq, head_dim) each
    cos, sin = cos[0].t().contiguous()[:, None], sin[0].t().contiguous()[:, None]  # (head_dim, 1, seq)
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        x = rms_norm(h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        qkv = attn.q_proj.group.forward_fm(x)  # (q_rows + 2 kv_rows, T)
        del x
        # (batch, heads, seq, head_dim) copies: SDPA's fused CPU kernel needs contiguous head rows
        # (on strided views it falls back to the unfused math path, ≈ 1.6× slower here).
        q = rotate(qkv[:q_rows].view(n_heads, head_dim, batch, seq), cos, sin).permute(2, 0, 3, 1).contiguous()
        k = rotate(qkv[q_rows:q_rows + kv_rows].view(n_kv, head_dim, batch, seq), cos, sin)
        k = k.permute(2, 0, 3, 1).contiguous()
        v = qkv[q_rows + kv_rows:].view(n_kv, head_dim, batch, seq).permute(2, 0, 3, 1).contiguous()
        del qkv
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=n_kv != n_heads)
        del q, k, v
        o = o.permute(1, 3, 0, 2).reshape(q_rows, n_tok)  # back to (heads·head_dim, T)
        h += attn.o_proj.group.forward_fm(o)
        del o
        x = rms_norm(h, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        group = mlp.gate_proj.group
        gate_up = group.forward_fm(x, out=_buffer(workspace, "gate_up", (group.offsets[-1], n_tok), h))  # (2·ffn, T)
        del x
        ffn = gate_up.shape[0] // 2
        if isinstance(mlp.act_fn, nn.SiLU):  # in place: no (ffn, T) allocation
            act = F.silu(gate_up[:ffn], inplace=True).mul_(gate_up[ffn:])
        else:
            act = mlp.act_fn(gate_up[:ffn]).mul_(gate_up[ffn:])
        h += mlp.down_proj.group.forward_fm(act)
        del act
    h = rms_norm(h, inner.norm.weight, inner.norm.variance_epsilon)
    if out is None:
        out = h.new_empty(batch, seq, model.lm_head.weight.shape[0])
    torch.mm(h.t(), model.lm_head.weight.t(), out=out.view(n_tok, -1))  # reads h transposed: no copy
    return out


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
