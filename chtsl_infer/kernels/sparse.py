"""The inference runtime's sparse product, feature-major: `Y = S X`.

Shapes: S (out, in) as CSR — crow int32 (out+1,), col (nnz,) int16/int32 columns or uint8 column deltas
(`absolute_columns`), values (nnz,) fp32, bf16 or int8 with one fp32 scale per row —, X (in, T) and
Y (out, T) with T = tokens. The runtime keeps activations feature-major
(`chtsl_infer.runtime.feature_major`) so neither side needs a transpose.

CPU (`spmm_cpu`): the `spmm` kernel (`csrc/spmm.c`, `csrc/spmm_bf16.c`). Why C and not numba (the
previous kernel): numba/LLVM picked 256-bit vectors and spilled the accumulators; explicit vectors of
one host register run 1.5–2.5× faster (`benchmarks/kernels.py`). Without the compiled kernels it
falls back to torch's CSR matmul (correct, slower). CUDA (`spmm_cuda`): torch's CSR matmul (cuSPARSE).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from chtsl_infer.kernels.build import kernel
from chtsl_infer.kernels.settings import settings


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` (2-D) itself if its rows are contiguous (what the C kernels read), else a contiguous copy."""
    return t if t.stride(1) == 1 and t.stride(0) >= t.shape[1] else t.contiguous()


def csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
    """A `torch.sparse_csr_tensor` view of a CSR triple (int32 indices are kept: cuSPARSE's own type)."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=(crow.numel() - 1, n_cols), check_invariants=False)


def absolute_columns(crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """int64 (nnz,): the column of every link. int16/int32 `col` are the columns; uint8 `col` are 8-bit
    deltas within each row (col_k = col_{k-1} + delta_k, col_{-1} = 0; docs/formats.md §2), summed here."""
    if col.dtype != torch.uint8:
        return col.long()
    total = col.long().cumsum(0)
    before = torch.cat([total.new_zeros(1), total])[crow[:-1].long()]  # the running sum before each row
    return total - torch.repeat_interleave(before, (crow[1:] - crow[:-1]).long(), output_size=col.numel())


def spmm_cpu(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
             out: torch.Tensor | None = None, rows: torch.Tensor | None = None,
             scale: torch.Tensor | None = None) -> torch.Tensor:
    """`S X` on CPU: x (in, T) with contiguous rows -> (out, T); S a CSR triple (out rows).

    float32 x with float32 values: fp32 throughout, or with int8 values: each stored row r's sum times
    scale[r] (`csrc/spmm.c`; the weights are scale[r] · q). bfloat16 x and values: bf16 in memory, fp32
    accumulation, the result rounded to bf16 (`csrc/spmm_bf16.c`). `col`: int16/int32 columns or uint8
    column deltas. `scale`: fp32 (out,) per stored row, required for int8 values, optional otherwise.
    `out`, if given, is a (out, T) tensor of x's dtype with contiguous rows the result is written into.
    `rows` (int32, out): stored CSR row r is output row rows[r] (see `sort_rows`); None: identity.
    """
    dtype = x.dtype
    if not (dtype == values.dtype in (torch.float32, torch.bfloat16)
            or dtype == torch.float32 and values.dtype == torch.int8):
        raise TypeError(f"spmm_cpu computes float32 or bfloat16 (x and values alike, or float32 x with int8 "
                        f"values), got x {x.dtype} and values {values.dtype}")
    n_in, n_tok = x.shape
    x = rows_contiguous(x)  # the kernel reads rows of n_tok contiguous values
    n_out = crow.numel() - 1
    if out is not None and (out.shape != (n_out, n_tok) or out.dtype != dtype or out.device.type != "cpu"
                            or out.stride(1) != 1 or out.stride(0) < n_tok):
        raise ValueError(f"spmm_cpu: out must be a CPU {dtype} ({n_out}, {n_tok}) tensor with contiguous rows")
    if (values.dtype == torch.int8) > (scale is not None) or scale is not None and (
            scale.dtype != torch.float32 or scale.shape != (n_out,) or not scale.is_contiguous()):
        raise TypeError(f"spmm_cpu: scale must be a contiguous float32 ({n_out},) tensor (required for int8 values)")
    y = torch.empty(n_out, n_tok, dtype=dtype) if out is None else out
    if n_tok == 0 or n_out == 0:
        return y.zero_()
    if col.dtype not in (torch.int16, torch.int32, torch.uint8) or crow.dtype != torch.int32:
        raise TypeError(f"spmm_cpu reads int32 row pointers and int16/int32 columns or uint8 column deltas, got "
                        f"{crow.dtype}/{col.dtype}")
    fn = kernel("spmm", dtype=values.dtype, index=col.dtype)
    if fn is None:
        weights = values.float() if scale is None else values.float() * torch.repeat_interleave(
            scale, (crow[1:] - crow[:-1]).long(), output_size=values.numel())
        result = csr_tensor(crow.long(), absolute_columns(crow, col), weights, n_in) @ x.float()
        if rows is None:
            return y.copy_(result)
        y[rows.long()] = result.to(dtype)
        return y
    threads = torch.get_num_threads()
    tile = settings().token_tile(n_in, n_tok)
    n_chunks = settings().row_chunks(1 if tile == 0 else -(-n_tok // tile), threads)
    if rows is not None and (rows.dtype != torch.int32 or rows.numel() != n_out or not rows.is_contiguous()):
        raise TypeError(f"spmm_cpu: rows must be a contiguous int32 permutation of {n_out} rows")
    if fn(x.data_ptr(), x.stride(0), n_in, n_tok, crow.data_ptr(), col.data_ptr(), values.data_ptr(),
          None if scale is None else scale.data_ptr(), None if rows is None else rows.data_ptr(), y.data_ptr(),
          y.stride(0), n_out, tile, n_chunks, threads):
        raise MemoryError("spmm_cpu: could not allocate the kernel's buffers")
    return y


A8_PAGE, A8_ROWS, A8_STEP = 256, 16, 128  # csrc/kernels.h: features per page, rows per group, bytes per step
A8_SPILL_COST = 10  # bytes a spilled link counts for in a8_pack's choice of steps (csrc/spmm_a8.c)


@dataclass(frozen=True)
class A8Matrix:
    """S (n_rows × n_in, int8 weights) in `csrc/spmm_a8.c`'s layout for int8 activations.

    steps: uint8 (⌈n_rows/16⌉, pages): 128-byte steps per group of 16 stored rows and page of 256
    input features; start: int32 (groups + 1,) each group's first step; data: uint8 (steps · 128,) the
    page-local columns and weights; spill_n, spill_start, spill: the same for the links past a page's
    steps (3 bytes each: lane, column, weight); scale: fp32 (n_rows,) the stored rows' weight scales;
    rows: int32 (n_rows,) stored row -> output row. Built by `a8_pack`."""

    n_in: int
    steps: torch.Tensor
    start: torch.Tensor
    data: torch.Tensor
    spill_n: torch.Tensor
    spill_start: torch.Tensor
    spill: torch.Tensor
    scale: torch.Tensor
    rows: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The layout's own tensors (steps, start, data, spill_n, spill_start, spill)."""
        return self.steps, self.start, self.data, self.spill_n, self.spill_start, self.spill

    def pointers(self) -> tuple[int, ...]:
        """Their data pointers, in `table.A8Layout`'s (csrc/kernels.h `a8_layout`) field order."""
        return (self.steps.data_ptr(), self.data.data_ptr(), self.start.data_ptr(), self.spill_n.data_ptr(),
                self.spill.data_ptr(), self.spill_start.data_ptr())

    @property
    def n_rows(self) -> int:
        return self.rows.numel()


def a8_pack(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor,
            n_in: int, spill_cost: int = A8_SPILL_COST) -> A8Matrix:
    """The `A8Matrix` of a CSR with int8 values: crow int32 (n_rows + 1,), col int16/int32 absolute columns
    (uint8 deltas are summed first), values int8 (nnz,), scale fp32 (n_rows,), rows int32 (n_rows,).
    Rows are grouped 16 at a time in their stored order (sorted by link count: similar rows share a
    group's padding); `spill_cost` weighs a spilled link against a step's 128 bytes (a huge one: no
    spills, every row padded to its group's most links per page). RuntimeError without the compiled
    kernels; ValueError for a column outside [0, n_in)."""
    fn = kernel("a8_pack")
    if fn is None:
        raise RuntimeError("int8 activations need the compiled CPU kernels")
    if col.dtype == torch.uint8:
        col = absolute_columns(crow, col).to(torch.int32)
    if col.dtype not in (torch.int16, torch.int32) or values.dtype != torch.int8 or crow.dtype != torch.int32:
        raise TypeError(f"a8_pack reads int32 row pointers, int16/int32 columns and int8 values, got "
                        f"{crow.dtype}/{col.dtype}/{values.dtype}")
    n_rows = crow.numel() - 1
    crow, col, values = crow.contiguous(), col.contiguous(), values.contiguous()
    steps = torch.empty(-(-n_rows // A8_ROWS), -(-n_in // A8_PAGE), dtype=torch.uint8)
    spill_n = torch.empty_like(steps)
    start = torch.empty(steps.shape[0] + 1, dtype=torch.int32)
    spill_start = torch.empty_like(start)
    args = (crow.data_ptr(), col.data_ptr(), col.element_size(), values.data_ptr(), n_rows, n_in, spill_cost,
            steps.data_ptr(), start.data_ptr(), spill_n.data_ptr(), spill_start.data_ptr())
    data = spill = None
    for sized in (False, True):  # sizes first, then the bytes
        if sized:
            data = torch.empty(int(start[-1]) * A8_STEP, dtype=torch.uint8)
            spill = torch.empty(int(spill_start[-1]) * 3, dtype=torch.uint8)
        status = fn(*args, None if data is None else data.data_ptr(), None if spill is None else spill.data_ptr())
        if status == 1:
            raise ValueError(f"a8_pack: a column outside [0, {n_in})")
        if status:
            raise MemoryError(f"a8_pack failed (status {status})")
    assert data is not None and spill is not None
    return A8Matrix(n_in, steps, start, data, spill_n, spill_start, spill, scale.float().contiguous(),
                    rows.to(torch.int32).contiguous())


def spmm_a8(x: torch.Tensor, layout: A8Matrix, out: torch.Tensor | None = None) -> torch.Tensor:
    """`S X` with int8 activations: x (in, T) fp32 -> (n_rows, T) fp32 (`csrc/spmm_a8.c`).

    Each token's x is rounded to int8 per page of 256 features (scale max|x|/127), multiplied with the
    int8 weights in int32 per page, and summed over pages in fp32 × the page scale, then × the row's
    weight scale. `out`: a (n_rows, T) fp32 tensor with contiguous rows, written into."""
    fn = kernel("spmm_a8")
    if fn is None:
        raise RuntimeError("int8 activations need the compiled CPU kernels")
    if x.dtype != torch.float32 or x.shape[0] != layout.n_in:
        raise TypeError(f"spmm_a8 takes float32 x of {layout.n_in} features, got {x.dtype} {tuple(x.shape)}")
    x = rows_contiguous(x)
    n_tok = x.shape[1]
    y = torch.empty(layout.n_rows, n_tok) if out is None else out
    if y.shape != (layout.n_rows, n_tok) or y.dtype != torch.float32 or y.stride(1) != 1 and n_tok > 1:
        raise ValueError(f"spmm_a8: out must be a float32 ({layout.n_rows}, {n_tok}) tensor with contiguous rows")
    if n_tok == 0 or layout.n_rows == 0:
        return y.zero_()
    threads = torch.get_num_threads()
    if fn(x.data_ptr(), x.stride(0), layout.n_in, n_tok, layout.steps.data_ptr(), layout.start.data_ptr(),
          layout.data.data_ptr(), layout.spill_n.data_ptr(), layout.spill_start.data_ptr(), layout.spill.data_ptr(),
          layout.scale.data_ptr(), layout.rows.data_ptr(), layout.n_rows, y.data_ptr(), y.stride(0),
          settings().row_chunks(1, threads), threads):
        raise MemoryError("spmm_a8: could not allocate the kernel's buffers")
    return y


def a8_round(x: torch.Tensor, page: int = A8_PAGE) -> torch.Tensor:
    """x (in, T) float32 feature-major as the int8-activation kernels see it: each token's features in
    pages of `page`, every page rounded to int8 levels of its own scale max|x|/127 (ties to even),
    then scaled back: the float32 tensor (in, T) of q · scale. A product with it in float equals the
    kernels' int32-per-page product up to summation order (csrc/spmm_a8.c `a8_quantize`; a low-rank
    member's h is one page of its rank, `a8_lowrank_b_rows`)."""
    n_in, n_tok = x.shape
    pages = -(-n_in // page)
    padded = torch.zeros(pages * page, n_tok, dtype=torch.float32)
    padded[:n_in] = x
    paged = padded.view(pages, page, n_tok)
    most = paged.abs().amax(dim=1, keepdim=True)  # (pages, 1, T)
    scale = most / torch.full_like(most, 127.0)  # a true division, as C's (a scalar divisor is a reciprocal)
    q = torch.where(scale > 0, torch.round(paged / scale.clamp_min(torch.finfo(torch.float32).tiny)), 0.0)
    return (q.clamp_(-127, 127) * scale).view(-1, n_tok)[:n_in]


def a8_panels(lora_b: torch.Tensor, outs: list[int], ranks: list[int]) -> torch.Tensor:
    """A fused group's int8 B blocks (out_m × r_m, flattened back to back) as the panels of
    `csrc/spmm_a8.c` `a8_lowrank_b_rows`: per member, per block of 16 rows, ⌈r_m/4⌉ steps of 64 bytes,
    byte 4i + j of step k = B_m[16 · block + i, 4k + j] (zero past the rows and the rank). int8, flat."""
    parts, b0 = [], 0
    for n_out, r in zip(outs, ranks, strict=True):
        rows, steps = _panel_shape(n_out, r)
        block = torch.zeros(rows, steps * 4, dtype=torch.int8)
        block[:n_out, :r] = lora_b[b0:b0 + n_out * r].view(n_out, r)
        parts.append(block.view(-1, A8_ROWS, steps, 4).permute(0, 2, 1, 3).reshape(-1))
        b0 += n_out * r
    return torch.cat(parts)


def _panel_shape(n_out: int, rank: int) -> tuple[int, int]:
    """A member's padded rows (whole blocks of 16) and steps (4 ranks each) in `a8_panels`."""
    return -(-n_out // A8_ROWS) * A8_ROWS, -(-rank // 4)


def a8_panel_block(panels: torch.Tensor, outs: list[int], ranks: list[int], member: int) -> torch.Tensor:
    """Member `member`'s B (out_m × r_m, int8) from `a8_panels`' layout (a copy)."""
    start = sum(rows * steps * 4 for rows, steps in map(_panel_shape, outs[:member], ranks[:member]))
    rows, steps = _panel_shape(outs[member], ranks[member])
    flat = panels[start:start + rows * steps * 4]
    return flat.view(-1, steps, A8_ROWS, 4).permute(0, 2, 1, 3).reshape(rows, steps * 4)[:outs[member], :ranks[member]]


def sort_rows(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The CSR with its rows stored by increasing link count: (crow, col, values, rows int32).

    `rows[r]` is the output row of stored row r (pass it to `spmm_cpu`; a per-row `scale` of S goes
    along as scale[rows]). Runs of equal-length rows let the CPU predict the kernel's per-row loop
    exits. Rows move whole, so column deltas stay valid.
    """
    counts = (crow[1:] - crow[:-1]).long()
    order = torch.argsort(counts, stable=True)
    starts = crow[:-1].long()[order]
    new_counts = counts[order]
    new_crow = torch.zeros_like(crow)
    new_crow[1:] = new_counts.cumsum(0).to(crow.dtype)
    # link k of stored row r comes from starts[r] + (k - new_crow[r])
    within = torch.arange(int(new_counts.sum())) - torch.repeat_interleave(new_crow[:-1].long(), new_counts)
    index = torch.repeat_interleave(starts, new_counts) + within
    return new_crow, col[index].contiguous(), values[index].contiguous(), order.to(torch.int32)


def torch_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int],
              device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    """S (out, in) as a `torch.sparse_csr_tensor` for `spmm_cuda`: crow (out+1,) and col (nnz,) of any
    integer dtype become int32 (cuSPARSE takes int32 or int64 indices, both alike; packed columns
    may be int16; uint8 column deltas are summed first), values (nnz,) the compute dtype."""
    if crow.numel() - 1 != size[0]:
        raise ValueError(f"torch_csr: {crow.numel() - 1} row pointers for {size[0]} rows")
    col = absolute_columns(crow, col) if col.dtype == torch.uint8 else col
    return csr_tensor(crow.to(device, torch.int32), col.to(device, torch.int32), values.to(device, dtype), size[1])


def spmm_cuda(x: torch.Tensor, csr: torch.Tensor) -> torch.Tensor:
    """`S X` on CUDA with cuSPARSE: x (in, T), csr a (out, in) `torch.sparse_csr_tensor` -> (out, T)."""
    return csr @ x
