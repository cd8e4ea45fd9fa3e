"""Dense int8 weights in the runtime: products with one fp32 scale per row, activations in float.

A packed int8 model (docs/formats.md §2) stores its low-rank factors, a dense method's weights and the
lm_head as int8 `q` (rows, in) with `scale` (rows,): the weight is scale[:, None] · q. `int8_mm` is
their product with feature-major activations: for a few tokens (decoding) the int8 GEMV of
`kernels.dense_gemv`, which streams the int8 rows and multiplies each sum by its scale; otherwise,
and where the compiled kernels do not apply, torch's GEMM on blocks of rows dequantized into a small
fp32 buffer (`BLOCK_ELEMENTS` at a time), so no fp32 copy of the whole weight is ever resident.
`Int8Linear` is the lm_head of an int8 runtime model.
"""

from __future__ import annotations

import torch
from torch import nn

from chtsl_infer import kernels
from chtsl_infer.formats.encoding import dequantize_rows

BLOCK_ELEMENTS = 1 << 20  # weights dequantized at once by the blocked GEMM (4 MiB of fp32)


def int8_mm(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None,
            int8_activations: bool = False) -> torch.Tensor:
    """out (rows, T) = (scale[:, None] · q) @ x: q int8 (rows, in) contiguous, scale fp32 (rows,), x (in, T)
    fp32 or bf16 feature-major; out in x's dtype (allocated when None). Sums in fp32 on CPU.
    `int8_activations`: x rounded as `kernels.a8_round` rounds it first (fp32 x; the VNNI rows of
    `csrc/spmm_a8.c` for a few tokens)."""
    rows, n_tok = q.shape[0], x.shape[1]
    if out is None:
        out = x.new_empty(rows, n_tok)
    if n_tok <= kernels.GEMV_MAX_TOKENS and q.device.type == "cpu":
        # The GEMV writes token-major rows (T, rows); one token is the same memory either way.
        target = out.t() if n_tok == 1 or out.stride(0) == 1 else out.new_empty(n_tok, rows)
        if kernels.dense_gemv(q, x.t(), target, scale=scale, int8_activations=int8_activations):
            return out if target.data_ptr() == out.data_ptr() else out.copy_(target.t())
    if int8_activations:
        x = kernels.a8_round(x.float())
    block = max(1, BLOCK_ELEMENTS // max(1, q.shape[1]))
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        torch.mm(dequantize_rows(q[r0:r1], scale[r0:r1], x.dtype), x, out=out[r0:r1])
    return out


class Int8Linear(nn.Module):
    """A bias-free linear with an int8 weight (out, in) and fp32 row scales (out,): y = x Wᵀ, W = scale · q.

    Buffers `weight` and `weight_scale`, the packed file's `<name>.weight` / `<name>.weight_scale`;
    forward takes token-major x (..., in) in fp32 or bf16 (transformers' calling convention).
    `int8_activations`: x is rounded to int8 per token and 256 features first (`int8_mm`), set by
    `runtime.fused.use_int8_activations`."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.int8_activations = False
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = int8_mm(self.weight, self.weight_scale, x.reshape(-1, self.in_features).t(),
                    int8_activations=self.int8_activations)
        return y.t().reshape(*lead, self.out_features)
