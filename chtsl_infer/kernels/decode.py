"""Decoding kernels for 1 … `GEMV_MAX_TOKENS` CPU tokens, fp32 or bf16, activations feature-major;
weights in the activations' dtype or int8 with one fp32 scale per row (fp32 activations).

`dense_gemv` (the lm_head) and `lowrank_fm` (a fused group's low-rank branch) are `csrc/gemv.c`;
`rms_norm_fm`, `silu_mul_fm` and `attention_decode` the glue of a decoder block (`csrc/decode.c`);
`GroupDecoder` binds one fused group's calls' constant arguments once, and `DecodeLayers` runs every
block of a decoding step in one C call (`decode_layers`). `feature_major.forward` uses them where
`decode_kernels_serve` says the compiled kernels apply, and torch otherwise.
"""

from __future__ import annotations

import ctypes

import torch

from chtsl_infer.kernels.build import kernel, require
from chtsl_infer.kernels.settings import settings
from chtsl_infer.kernels.sparse import A8_PAGE, A8Matrix, rows_contiguous, spmm_a8
from chtsl_infer.kernels.table import A8_INDEX, INDEX_CODES, A8Layout, DecLayer

GEMV_MAX_TOKENS = 4  # the C decoding kernels serve 1..4 tokens (their per-token accumulators); more go to torch
LOWRANK_ACTIVATIONS = {"silu": 0, "relu": 1, "gelu": 2, "identity": 3}  # csrc/activation.h's `act` codes


def activation_dtype(*tensors: torch.Tensor) -> torch.dtype | None:
    """The activations' dtype the decoding kernels compute these weights and activations in: float32 or
    bfloat16 where every tensor has it, int8 weights counting as float32 (they run with fp32
    activations); None where they disagree or another dtype is among them."""
    dtypes = {torch.float32 if t.dtype == torch.int8 else t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in (torch.float32, torch.bfloat16) else None


def decode_kernels_serve(*tensors: torch.Tensor) -> bool:
    """Whether the compiled decoding kernels apply to these operands: CPU tensors of one activation dtype
    (`activation_dtype`), and the library built (every decoding entry of the table has both variants)."""
    dtype = activation_dtype(*tensors)
    return (dtype is not None and all(t.device.type == "cpu" for t in tensors)
            and kernel("decode_layers", dtype) is not None)


def _scale_ptr(weight: torch.Tensor, scale: torch.Tensor | None, rows: int) -> int | None:
    """The data pointer of an int8 weight's per-row scales (a contiguous float32 (rows,)), None for a float
    weight without one; ValueError where an int8 weight lacks them or they are malformed."""
    if scale is None:
        if weight.dtype == torch.int8:
            raise ValueError("int8 weights need their per-row float32 scales")
        return None
    if scale.dtype != torch.float32 or scale.shape != (rows,) or not scale.is_contiguous():
        raise ValueError(f"row scales must be a contiguous float32 ({rows},) tensor, got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    return scale.data_ptr()


def dense_gemv(weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None = None,
               int8_activations: bool = False) -> bool:
    """out (T, n_out) = x (T, n_in) · weightᵀ for 1 ≤ T ≤ `GEMV_MAX_TOKENS` on CPU (`csrc/gemv.c`).

    weight: (n_out, n_in) contiguous fp32, bf16 or int8 (then `scale`, fp32 (n_out,), holds each row's
    scale: the weights are scale[o] · q); x: fp32 or bf16 (read as fp32); out: fp32 or bf16 with
    contiguous rows. Sums in fp32. `int8_activations` (int8 weights): x rounded as `sparse.a8_round`
    rounds it, products in int32 per 256-feature page (`csrc/spmm_a8.c` `gemv_a8`). Returns False
    (nothing written) where the compiled kernel does not apply: another device, more tokens, other
    dtypes, no compiler; callers then use torch.
    """
    n_tok = x.shape[0]
    if not (1 <= n_tok <= GEMV_MAX_TOKENS and weight.device.type == x.device.type == out.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16, torch.int8) and weight.is_contiguous()
            and x.dtype in (torch.float32, torch.bfloat16) and out.dtype in (torch.float32, torch.bfloat16)
            and out.shape == (n_tok, weight.shape[0]) and out.stride(1) == 1):
        return False
    if int8_activations and weight.dtype != torch.int8:
        raise ValueError("int8 activations go with int8 weights")
    scale_ptr = _scale_ptr(weight, scale, weight.shape[0])
    fn = kernel("gemv_a8") if int8_activations else kernel("gemv", dtype=weight.dtype)
    if fn is None:
        return False
    x = x.float().contiguous()
    y = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32)
    if fn(weight.data_ptr(), scale_ptr, weight.shape[0], weight.shape[1], x.data_ptr(), x.stride(0), n_tok,
          y.data_ptr(), y.stride(0), torch.get_num_threads()):
        return False
    if y is not out:
        out.copy_(y)
    return True


def lowrank_fm(lora_a: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, shapes: torch.Tensor, scale: float,
               activation: str, y: torch.Tensor, a_scale: torch.Tensor | None = None,
               b_scale: torch.Tensor | None = None, int8_activations: bool = False) -> bool:
    """y (Σ out_m, T) += scale · B_m act(A_m x) for every member m of a fused group, T ≤ `GEMV_MAX_TOKENS`.

    lora_a: (Σ r_m, in) the members' A stacked; x: (in, T) feature-major, any strides; lora_b:
    (Σ out_m·r_m,) the members' B blocks (out_m × r_m) flattened one after the other; shapes: int32
    (2, members) of out_m and r_m; y: (Σ out_m, T) with contiguous rows. CPU, all four float32 or all
    bfloat16 (sums and the hidden activations in fp32), or int8 A and B with fp32 x and y and their
    row scales `a_scale` (Σ r_m,) and `b_scale` (Σ out_m,) (`csrc/gemv.c`); `int8_activations` (int8
    factors, B as `sparse.a8_panels`, any T): A's input rounded as `sparse.a8_round` rounds it, and h
    per member (`csrc/spmm_a8.c` `lowrank_fm_a8`). Returns False, nothing written, where it does not
    apply (the caller uses torch).
    """
    n_tok = x.shape[1]
    if not (1 <= n_tok and (n_tok <= GEMV_MAX_TOKENS or int8_activations) and y.stride(1) == 1
            and activation in LOWRANK_ACTIVATIONS):
        return False
    if lora_b.dtype != lora_a.dtype or not decode_kernels_serve(lora_a, x, lora_b, y):
        return False
    if int8_activations and lora_a.dtype != torch.int8:
        raise ValueError("int8 activations go with int8 weights")
    fn = kernel("lowrank_fm_a8") if int8_activations else kernel("lowrank_fm", lora_a.dtype)
    n_rank, n_in = lora_a.shape
    a_ptr, b_ptr = _scale_ptr(lora_a, a_scale, n_rank), _scale_ptr(lora_b, b_scale, y.shape[0])
    scratch = torch.empty(n_tok * (n_in + n_rank), dtype=torch.float32)
    return not fn(lora_a.data_ptr(), a_ptr, n_rank, n_in, x.data_ptr(), x.stride(0), x.stride(1), n_tok,
                  lora_b.data_ptr(), b_ptr, shapes[0].data_ptr(), shapes[1].data_ptr(), shapes.shape[1],
                  scale, LOWRANK_ACTIVATIONS[activation], y.data_ptr(), y.stride(0),
                  scratch.data_ptr(), torch.get_num_threads())


def rms_norm_fm(h: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm, feature-major: h (H, T) -> out (H, T) with contiguous rows; weight (H,) contiguous.
    All three float32 or all bfloat16 (fp32 arithmetic)."""
    h = rows_contiguous(h)
    require("rms_norm_fm", h.dtype)(h.data_ptr(), h.stride(0), h.shape[0], h.shape[1], weight.data_ptr(), eps,
                                     out.data_ptr(), out.stride(0))
    return out


def silu_mul_fm(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """gate_up (2·ffn, T) float32 or bfloat16, contiguous rows: rows [0, ffn) become act(gate) · up in
    place; returns that view."""
    ffn = gate_up.shape[0] // 2
    require("silu_mul_fm", gate_up.dtype)(gate_up.data_ptr(), gate_up.stride(0), ffn, gate_up.shape[1],
                                           LOWRANK_ACTIVATIONS[activation])
    return gate_up[:ffn]


def attention_decode(qkv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, start: int, seq: int, n_heads: int, scale: float,
                     out: torch.Tensor) -> torch.Tensor:
    """RoPE, KV-cache write and attention for batch × seq new tokens at positions start … (`csrc/decode.c`).

    qkv: (q_rows + 2·kv_rows, batch·seq) feature-major with contiguous rows; key/value: one block's
    contiguous (batch, kv_heads, capacity, head_dim) cache, written at [start, start + seq); cos/sin:
    (head_dim, 1, capacity) contiguous; out: (n_heads·head_dim, batch·seq), contiguous rows. All float32
    or all bfloat16 (fp32 arithmetic).
    """
    batch, n_kv, capacity, head_dim = key.shape
    fn = require("attn_decode", qkv.dtype)
    if fn(qkv.data_ptr(), qkv.stride(0), batch, seq, n_heads, n_kv, head_dim, cos.data_ptr(), sin.data_ptr(),
          key.data_ptr(), value.data_ptr(), capacity, start, scale, out.data_ptr(), out.stride(0),
          settings().attn_min_work, torch.get_num_threads()):
        raise MemoryError("attention_decode: could not allocate the score buffers")
    return out


class GroupDecoder:
    """A fused group's `S x + scale · B act(A x)` for 1 … `GEMV_MAX_TOKENS` CPU tokens (decoding), fp32
    or bf16 (the group's dtype), or int8 weights with fp32 activations, the C calls' constant arguments
    bound once.

    At one token the kernels take ~50 µs per group at llama60m; the checks, pointer look-ups and
    tensor indexing of `spmm_cpu` / `lowrank_fm` added ~40 µs more. Same kernels, same results.
    csr: (crow, col, values, rows, values_scale): the group's sorted CSR, with the stored rows' fp32
    scales for int8 values (else None) (None: no sparse kernel, the caller computes the base part);
    lowrank: (lora_a, lora_b, shapes, a_scale, b_scale) as `lowrank_fm` takes them (None: no low-rank
    branch). a8: S in `spmm_a8`'s layout instead of `csr` (int8 weights and activations). Build it where
    `decode_kernels_serve` holds for its tensors.
    """

    def __init__(self, n_in: int, n_out: int, csr: tuple[torch.Tensor | None, ...] | None,
                 lowrank: tuple[torch.Tensor | None, ...] | None, scale: float, activation: str,
                 a8: A8Matrix | None = None) -> None:
        self.n_in, self.n_out = n_in, n_out
        self.csr = csr  # kept: the pointers below must stay valid
        self.a8 = a8
        self.int8 = a8 is not None
        if a8 is not None:  # decode_layers' buffers for the quantized input (spmm_a8 allocates its own)
            if csr is not None:
                raise ValueError("GroupDecoder: S is either a CSR or an A8Matrix")
            pages = -(-n_in // A8_PAGE)
            self.a8_x = torch.empty(GEMV_MAX_TOKENS * pages * A8_PAGE, dtype=torch.int8)
            self.a8_xs = torch.empty(GEMV_MAX_TOKENS * pages, dtype=torch.float32)
        if csr is not None:
            crow, col, values, rows, values_scale = csr
            self.spmm = require("spmm", values.dtype, col.dtype)
            self.int8 = values.dtype == torch.int8
            self.csr_ptrs = (crow.data_ptr(), col.data_ptr(), values.data_ptr(),
                             _scale_ptr(values, values_scale, n_out), rows.data_ptr())
        self.lowrank = lowrank
        if lowrank is not None:
            lora_a, lora_b, shapes, a_scale, b_scale = lowrank
            if csr is not None and (lora_a.dtype == torch.int8) != self.int8:
                raise ValueError("GroupDecoder: int8 sparse values need int8 low-rank factors (and float ones float)")
            self.int8 = lora_a.dtype == torch.int8
            if a8 is not None and not self.int8:
                raise ValueError("GroupDecoder: int8 activations need int8 low-rank factors")
            # int8 activations: A takes the input S takes, rounded the same way
            self.lowrank_fn = require("lowrank_fm_a8") if a8 is not None else require("lowrank_fm", lora_a.dtype)
            self.n_rank = lora_a.shape[0]
            shapes = shapes.contiguous()
            self.lowrank = (lora_a, lora_b, shapes, a_scale, b_scale)
            self.scratch = torch.empty(GEMV_MAX_TOKENS * (n_in + self.n_rank), dtype=torch.float32)
            self.lowrank_args = (lora_a.data_ptr(), _scale_ptr(lora_a, a_scale, self.n_rank), self.n_rank, n_in)
            self.lowrank_tail = (lora_b.data_ptr(), _scale_ptr(lora_b, b_scale, n_out), shapes.data_ptr(),
                                 shapes.data_ptr() + 4 * shapes.shape[1], shapes.shape[1], scale,
                                 LOWRANK_ACTIVATIONS[activation])

    @property
    def has_sparse(self) -> bool:
        return self.csr is not None or self.a8 is not None

    def sparse(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y (out, T) = S x (in, T); both with contiguous rows."""
        if self.a8 is not None:
            spmm_a8(x, self.a8, out=y)
            return
        threads, n_tok, current = torch.get_num_threads(), x.shape[1], settings()
        tile = current.token_tile(self.n_in, n_tok)  # 0 (gather) below gather_below tokens, else one 16-token tile
        if self.spmm(x.data_ptr(), x.stride(0), self.n_in, n_tok, *self.csr_ptrs,
                     y.data_ptr(), y.stride(0), self.n_out, tile, current.chunks_per_thread * threads, threads):
            raise MemoryError("GroupDecoder: could not allocate the kernel's buffers")

    def add_lowrank(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y (out, T) += scale · B act(A x) for every member; x (in, T), y with contiguous rows."""
        self.lowrank_fn(*self.lowrank_args, x.data_ptr(), x.stride(0), x.stride(1), x.shape[1], *self.lowrank_tail,
                        y.data_ptr(), y.stride(0), self.scratch.data_ptr(), torch.get_num_threads())


class DecodeLayers:
    """Every decoder block of a decoding step in one C call (`decode_layers` in `csrc/decode.c`): the
    kernels `feature_major.forward`'s loop calls one by one, in its order, for ≤ `GEMV_MAX_TOKENS`
    CPU tokens in fp32 or bf16. At llama1b the loop's ~14 Python calls per block cost 1/6 of a token.

    blocks: per block (input norm weight, post-attention norm weight, the `GroupDecoder`s of its
    (q, k, v), o, (gate, up) and down groups); every group's base is sparse or absent (not a dense
    weight), and the MLP's activation is SiLU. `dtype`: the activations' (int8 groups need float32).
    The tensors behind the pointers are kept referenced.
    """

    def __init__(self, blocks: list[tuple[torch.Tensor, torch.Tensor, list[GroupDecoder]]], eps: float, ffn: int,
                 dtype: torch.dtype) -> None:
        if dtype != torch.float32 and any(dec.int8 for _, _, groups in blocks for dec in groups):
            raise ValueError("DecodeLayers: int8 weights run with float32 activations")
        self.fn = require("decode_layers", dtype)
        self.blocks, self.eps, self.ffn, self.dtype = blocks, eps, ffn, dtype
        self.table = (DecLayer * len(blocks))()
        widest = 0
        for entry, (norm1, norm2, groups) in zip(self.table, blocks, strict=True):
            entry.norm1, entry.norm2 = norm1.data_ptr(), norm2.data_ptr()
            for slot, dec in zip(entry.group, groups, strict=True):
                slot.n_in, slot.n_out = dec.n_in, dec.n_out
                slot.int8 = int(dec.int8)
                if dec.csr is not None:
                    slot.crow, slot.col, slot.values, slot.values_scale, slot.rows = dec.csr_ptrs
                    slot.index = INDEX_CODES[dec.csr[1].dtype]
                elif dec.a8 is not None:
                    slot.index = A8_INDEX
                    slot.a8 = A8Layout(*dec.a8.pointers())
                    slot.values_scale, slot.rows = dec.a8.scale.data_ptr(), dec.a8.rows.data_ptr()
                    slot.a8_x, slot.a8_xs = dec.a8_x.data_ptr(), dec.a8_xs.data_ptr()
                if dec.lowrank is not None:
                    slot.lora_a, slot.a_scale, slot.n_rank = dec.lowrank_args[:3]
                    (slot.lora_b, slot.b_scale, slot.outs, slot.ranks, slot.n_members, slot.scale,
                     slot.act) = dec.lowrank_tail
                    widest = max(widest, dec.n_in + dec.n_rank)
                else:
                    widest = max(widest, dec.n_in)
        self.scratch = torch.empty(GEMV_MAX_TOKENS * widest, dtype=torch.float32)
        self.work: torch.Tensor | None = None

    def __call__(self, h: torch.Tensor, key: list[torch.Tensor], value: list[torch.Tensor], cos: torch.Tensor,
                 sin: torch.Tensor, start: int, batch: int, seq: int, n_heads: int, scale: float) -> None:
        """h (hidden, batch·seq) contiguous, updated in place through every block; key/value: each block's
        (batch, kv_heads, capacity, head_dim) cache, cos/sin its RoPE tables (see `attention_decode`)."""
        hidden, n_tok = h.shape
        _, n_kv, capacity, head_dim = key[0].shape
        q_rows = n_heads * head_dim
        size = n_tok * (2 * hidden + 2 * q_rows + 2 * n_kv * head_dim + 2 * self.ffn)
        if self.work is None or self.work.numel() < size:
            self.work = torch.empty(size, dtype=self.dtype)
        keys = (ctypes.c_void_p * len(key))(*[k.data_ptr() for k in key])
        values = (ctypes.c_void_p * len(value))(*[v.data_ptr() for v in value])
        threads, current = torch.get_num_threads(), settings()
        tile = current.token_tile(hidden, n_tok)  # ≤ GEMV_MAX_TOKENS tokens: the same for every group's n_in
        if self.fn(h.data_ptr(), hidden, batch, seq, ctypes.addressof(self.table), len(self.blocks),
                   ctypes.addressof(keys), ctypes.addressof(values), self.eps,
                   n_heads, n_kv, head_dim, cos.data_ptr(), sin.data_ptr(), capacity, start, scale,
                   tile, current.decode_item_bytes, current.attn_min_work, self.work.data_ptr(),
                   self.scratch.data_ptr(), threads):
            raise MemoryError("DecodeLayers: could not allocate the kernels' buffers")
