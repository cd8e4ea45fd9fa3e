"""The compressed encodings of packed format 2 (docs/formats.md §2): int8 rows and 8-bit column deltas.

int8 (symmetric, one fp32 scale per output row): a row w becomes q = round(w / s) ∈ [-127, 127] with
s = max|w| / 127 (round to nearest, ties to even), and reads back as s · q; a row without a non-zero
weight gets s = 1 (every scale is finite and > 0). For a CSR `S` the rows are its rows' links; for
a dense matrix (low-rank factors, a dense method's weight, the lm_head) its rows.

Column deltas: within a CSR row, uint8 delta_k = col_k − col_{k−1} with col_{−1} = 0 (so the first
delta may be 0, later ones are ≥ 1). A gap over 255 is bridged by padding links of delta 255 and
value 0 before the link, which the row pointers count like any link: ⌈gap / 255⌉ − 1 of them (at 5 %
density a gap over 255 has probability ≈ 0.95^255 ≈ 2·10⁻⁶). Decoding is
`chtsl_infer.kernels.sparse.absolute_columns`.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
DELTA_MAX = 255


def row_of_links(crow: torch.Tensor) -> torch.Tensor:
    """int64 (nnz,): the row of every link of a CSR with row pointers crow (out+1,)."""
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel()), counts, output_size=int(crow[-1]))


def _quantize(w: torch.Tensor, amax: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 like w, scale fp32 (rows,)) from each row's largest magnitude `amax` (float64)."""
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax)).float()
    per_weight = scale.double()[:, None] if rows is None else scale.double()[rows]
    q = torch.round(w.double() / per_weight).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense (rows, cols) matrix as (q int8 (rows, cols), scale fp32 (rows,)), w ≈ scale[:, None] · q."""
    return _quantize(w, w.double().abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0], dtype=torch.float64),
                     None)


def quantize_csr(crow: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A CSR's values (nnz,) as (q int8 (nnz,), scale fp32 (out,)) per row: values ≈ scale[row] · q."""
    rows = row_of_links(crow)
    amax = torch.zeros(crow.numel() - 1, dtype=torch.float64).scatter_reduce_(
        0, rows, values.double().abs(), "amax", include_self=True)
    return _quantize(values, amax, rows)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scale[:, None] · q of a dense int8 matrix, in `dtype` (computed in float64, rounded once)."""
    return (q.double() * scale.double()[:, None]).to(dtype)


def dequantize_csr(crow: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scale[row] · q of a CSR's int8 values (nnz,), in `dtype` (computed in float64, rounded once)."""
    return (q.double() * scale.double()[row_of_links(crow)]).to(dtype)


def delta_encode(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CSR (crow int32 (out+1,), col (nnz,) ascending within rows, values (nnz,)) with 8-bit column
    deltas: (crow int32, delta uint8 (n,), values (n,)), n = nnz + the padding links (value 0)."""
    col64 = col.long()
    rows = row_of_links(crow)
    first = torch.zeros_like(col64, dtype=torch.bool)
    starts = crow[:-1].long()
    first[starts[crow[1:].long() > starts]] = True  # each non-empty row's first link
    previous = torch.cat([col64.new_zeros(1), col64[:-1]])
    gap = torch.where(first, col64, col64 - previous)
    pads = torch.where(gap > DELTA_MAX, (gap - 1) // DELTA_MAX, torch.zeros_like(gap))
    position = torch.cumsum(pads + 1, 0) - 1  # where each link lands, after its padding links
    n = int(position[-1]) + 1 if col64.numel() else 0
    delta = torch.full((n,), DELTA_MAX, dtype=torch.uint8)
    delta[position] = (gap - DELTA_MAX * pads).to(torch.uint8)
    padded = torch.zeros(n, dtype=values.dtype)
    padded[position] = values
    per_row = torch.zeros(crow.numel() - 1, dtype=torch.long).index_add_(0, rows, pads + 1)
    new_crow = torch.zeros_like(crow)
    new_crow[1:] = torch.cumsum(per_row, 0).to(crow.dtype)
    return new_crow, delta, padded
