"""Kernels of sparse-native training and of the topology update, token-major activations (N, features).

`csr_mm`, `csr_sddmm` (used by `chtsl_infer.model.csr.csr_linear`): `csr_mm` is `x Aᵀ` (the forward on
S, dx on its transpose) and `csr_sddmm` the values' gradient at the links. CPU float32: the C kernels
`csr_mm_tm` and `csr_sddmm_tm` (`csrc/csr_train.c`); otherwise (CUDA, float64, no compiler) torch's
sparse CSR ops — `@` (cuSPARSE SpMM on CUDA) and `torch.sparse.sampled_addmm` (cuSPARSE SDDMM).
Measured on one loaded AMD EPYC (AVX2) core at 512 tokens and 5 % density
(`benchmarks/train_kernels.py`): each of the three takes 0.05–0.06× the dense layer's forward +
backward, the three together 0.15–0.18×, where the torch ops take 0.6×. `csr_transpose` builds the
transposed structure (a counting sort), `ch2_l3n_half` the CH2-L3n scores of a topology update
(`csrc/ch_scores.c`).
"""

from __future__ import annotations

import torch

from chtsl_infer.kernels.build import cpu_kernel, require
from chtsl_infer.kernels.settings import settings
from chtsl_infer.kernels.sparse import csr_tensor, rows_contiguous


def csr_mm_torch(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                 n_rows: int) -> torch.Tensor:
    """`x Aᵀ` with torch's sparse CSR matmul (cuSPARSE on CUDA, MKL on CPU): x (N, K) -> (N, n_rows)."""
    n_tok, n_cols = x.shape
    if n_tok == 0 or n_rows == 0 or col.numel() == 0:
        return torch.zeros(n_tok, n_rows, dtype=x.dtype, device=x.device)
    a = csr_tensor(crow, col, values, n_cols)
    return (a @ x.t()).t().contiguous()


def csr_sddmm_torch(dy: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                    n_cols: int) -> torch.Tensor:
    """`(dyᵀ x)` at the CSR's positions with `torch.sparse.sampled_addmm`: dy (N, R), x (N, K) -> (nnz,)."""
    nnz = col.numel()
    if nnz == 0 or dy.shape[0] == 0:
        return torch.zeros(nnz, dtype=dy.dtype, device=dy.device)
    pattern = csr_tensor(crow, col, torch.zeros(nnz, dtype=dy.dtype, device=dy.device), n_cols)
    return torch.sparse.sampled_addmm(pattern, dy.t().contiguous(), x.contiguous(), beta=0.0).values()


def csr_mm(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
           n_rows: int) -> torch.Tensor:
    """`y = x Aᵀ`, token-major: x (N, K), A (n_rows × K) a CSR triple (int32 indices) -> y (N, n_rows).

    Used as `y = x Sᵀ` (forward) and, on the transposed structure, `dx = dy S` (backward).
    CPU float32: the compiled `csr_mm_tm` (`csrc/csr_train.c`); otherwise (CUDA, float64, no
    compiler) torch's sparse CSR matmul.
    """
    fn = cpu_kernel("csr_mm_tm", x, values)
    if fn is None:
        return csr_mm_torch(x, crow, col, values, n_rows)
    n_tok, n_cols = x.shape
    y = torch.empty(n_tok, n_rows, dtype=torch.float32)
    if n_tok == 0 or n_rows == 0 or col.numel() == 0:
        return y.zero_()
    x = rows_contiguous(x)
    threads, current = torch.get_num_threads(), settings()
    tile = current.train_tile(n_tok)
    n_chunks = current.row_chunks(-(-n_tok // tile), threads)
    crow, col, values = crow.contiguous(), col.contiguous(), values.contiguous()
    if fn(x.data_ptr(), x.stride(0), n_tok, n_cols, crow.data_ptr(), col.data_ptr(), values.data_ptr(),
          n_rows, y.data_ptr(), y.stride(0), tile, n_chunks, threads):
        raise MemoryError("csr_mm: could not allocate the kernel's tile buffers")
    return y


def csr_sddmm(dy: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, n_cols: int) -> torch.Tensor:
    """SDDMM, token-major: out[k] = Σ_n dy[n, row_k] · x[n, col_k] over the CSR's links -> (nnz,).

    dy (N, n_rows), x (N, n_cols): the gradient of `x Sᵀ` with respect to S's values.
    CPU float32: the compiled `csr_sddmm_tm`; otherwise `torch.sparse.sampled_addmm`.
    """
    fn = cpu_kernel("csr_sddmm_tm", dy, x)
    if fn is None:
        return csr_sddmm_torch(dy, x, crow, col, n_cols)
    n_tok, n_rows = dy.shape
    out = torch.empty(col.numel(), dtype=torch.float32)
    dy, x = rows_contiguous(dy), rows_contiguous(x)
    crow, col = crow.contiguous(), col.contiguous()
    if fn(dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), n_tok, n_rows, n_cols, crow.data_ptr(),
          col.data_ptr(), out.data_ptr(), settings().sddmm_tile_for(n_tok, n_cols), torch.get_num_threads()):
        raise MemoryError("csr_sddmm: could not allocate the kernel's tile buffers")
    return out


def csr_transpose(crow: torch.Tensor, col: torch.Tensor,
                  n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The transposed pattern of a valid int32 CSR (n_rows × n_cols): (t_crow (n_cols+1,), t_row, t_perm (nnz,)).

    Column j's entries are t_crow[j] .. t_crow[j+1]-1 with rows t_row ascending; t_perm[e] is the value
    index of transposed entry e. int32 throughout. CPU: the compiled counting sort; else a stable argsort.
    """
    n_rows, nnz = crow.numel() - 1, col.numel()
    fn = cpu_kernel("csr_transpose", crow, col)
    if fn is not None and crow.dtype == torch.int32 and col.dtype == torch.int32:
        crow, col = crow.contiguous(), col.contiguous()
        t_crow = torch.empty(n_cols + 1, dtype=torch.int32)
        t_row, t_perm = torch.empty(nnz, dtype=torch.int32), torch.empty(nnz, dtype=torch.int32)
        if fn(crow.data_ptr(), col.data_ptr(), n_rows, n_cols, t_crow.data_ptr(), t_row.data_ptr(),
              t_perm.data_ptr()) == 0:
            return t_crow, t_row, t_perm
    rows = torch.repeat_interleave(torch.arange(n_rows, dtype=torch.int32, device=crow.device),
                                   (crow[1:] - crow[:-1]).long())
    perm = torch.argsort(col, stable=True)  # entries are sorted by (row, col): a stable sort by col gives (col, row)
    t_crow = torch.zeros(n_cols + 1, dtype=torch.int64, device=crow.device)
    torch.cumsum(torch.bincount(col.long(), minlength=n_cols), 0, out=t_crow[1:])
    return t_crow.to(torch.int32), rows[perm].contiguous(), perm.to(torch.int32)


def ch2_l3n_half(crow: torch.Tensor, col: torch.Tensor, tcrow: torch.Tensor, tcol: torch.Tensor,
                 shape: tuple[int, int]) -> torch.Tensor:
    """One half of the CH2-L3n scores of a 0/1 CPU matrix M (n_rows, n_cols), float64 (n_rows, n_cols):
    `Σ_v P[u, v] M[v, j]` with P from D = M Mᵀ and M's row degrees (`csrc/ch_scores.c`); the scores
    are `half(M) + half(Mᵀ)ᵀ`. M is given as CSR (crow, col) and its transpose as (tcrow, tcol), any
    integer dtypes (`model.csr.mask_to_csr`). Needs the compiled kernels (`cpu_kernel_status`)."""
    fn = require("ch2_l3n_half")
    n_rows, n_cols = shape
    crow, col, tcrow, tcol = (t.to(torch.int32).contiguous() for t in (crow, col, tcrow, tcol))
    out = torch.zeros(n_rows, n_cols, dtype=torch.float64)
    if fn(crow.data_ptr(), col.data_ptr(), tcrow.data_ptr(), tcol.data_ptr(), n_rows, n_cols, out.data_ptr(),
          torch.get_num_threads()):
        raise MemoryError("ch2_l3n_half: could not allocate the kernel's buffers")
    return out
