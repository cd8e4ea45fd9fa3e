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

from chtsl_infer.errors import ChtslError
from chtsl_infer.kernels.sparse import absolute_columns

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


def _product(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q · scale (broadcast) in `dtype`: computed in float64 for float64, else in float32 (exact product of
    an 8-bit and a 24-bit significand, rounded once), then cast."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(wide) * scale.to(wide)).to(dtype)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scale[:, None] · q of a dense int8 matrix (rows, cols), in `dtype`."""
    return _product(q, scale[:, None], dtype)


def dequantize_csr(crow: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scale[row] · q of a CSR's int8 values (nnz,), in `dtype`."""
    return _product(q, scale[row_of_links(crow)], dtype)


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


def padding_links(crow: torch.Tensor, delta: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """bool (n,): the links of a delta-encoded CSR that read as padding — delta 255, value 0, and another
    link after them in their row (what `delta_encode` adds). A stored link of value 0 exactly 255
    columns after the previous one, with another after it, reads so too: it adds nothing either way."""
    last = torch.zeros(delta.numel(), dtype=torch.bool)
    ends = crow[1:].long()
    last[ends[ends > crow[:-1].long()] - 1] = True
    return (delta == DELTA_MAX) & (values == 0) & ~last


def delta_decode(crow: torch.Tensor, delta: torch.Tensor, values: torch.Tensor, col_dtype: torch.dtype,
                 links: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `delta_encode`: (crow int32, col `col_dtype`, values) without the padding links.

    `links`: the number of links the CSR must have (a layer whose support size is fixed); where the
    padding rule dropped zero-valued links that were stored ones (`padding_links`), the first of the
    links read as padding are kept until there are that many. The product is the same either way."""
    pad = padding_links(crow, delta, values)
    if links is not None and delta.numel() - int(pad.sum()) < links:
        candidates = pad.nonzero()[:, 0]
        pad[candidates[:links - (delta.numel() - candidates.numel())]] = False
    keep = ~pad
    per_row = torch.zeros(crow.numel() - 1, dtype=torch.long).index_add_(0, row_of_links(crow), keep.long())
    new_crow = torch.zeros_like(crow)
    new_crow[1:] = torch.cumsum(per_row, 0).to(crow.dtype)
    return new_crow, absolute_columns(crow, delta)[keep].to(col_dtype), values[keep]


# ----------------------------------------------------------------------------- validation (the loader's)


def check_scale(where: str, scale: torch.Tensor, rows: int) -> None:
    """ChtslError unless `scale` is an int8 tensor's row scales: float32 (rows,), finite and > 0."""
    if scale.dtype != torch.float32 or tuple(scale.shape) != (rows,):
        raise ChtslError(f"{where} must be float32 of shape ({rows},), got {scale.dtype} {tuple(scale.shape)}")
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ChtslError(f"{where}: row {i}'s scale is {float(scale[i])} (scales must be finite and > 0)")


def check_int8(where: str, q: torch.Tensor) -> None:
    """ChtslError where an int8 tensor holds −128 (symmetric quantization uses [−127, 127])."""
    if q.numel() and int(q.min()) < -INT8_MAX:
        raise ChtslError(f"{where} holds -128; int8 weights are in [-127, 127]")


def check_deltas(where: str, crow: torch.Tensor, delta: torch.Tensor, in_features: int) -> None:
    """ChtslError unless the column deltas (n,) are consistent with the row pointers crow (out+1,): uint8,
    every delta after a row's first ≥ 1, and each row's last column < in_features. crow is checked
    (int32, monotone from 0 to n) by the caller."""
    if delta.dtype != torch.uint8 or delta.dim() != 1:
        raise ChtslError(f"{where} must be a 1-D uint8 tensor, got {delta.dtype} {tuple(delta.shape)}")
    first = torch.zeros(delta.numel(), dtype=torch.bool)
    starts = crow[:-1].long()
    first[starts[crow[1:].long() > starts]] = True
    repeated = (delta == 0) & ~first
    if bool(repeated.any()):
        row = int(row_of_links(crow)[int(repeated.nonzero()[0, 0])])
        raise ChtslError(f"{where}: row {row} repeats a column (a delta of 0 after its first link)")
    columns = absolute_columns(crow, delta)
    if columns.numel() and int(columns.max()) >= in_features:
        row = int(row_of_links(crow)[int(columns.argmax())])
        raise ChtslError(f"{where}: row {row} reaches column {int(columns.max())}, past in_features={in_features}")
