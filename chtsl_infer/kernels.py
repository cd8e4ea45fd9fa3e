"""Sparse-times-dense kernels for the sparse branch `Y = X Sᵀ` (S in CSR, X dense).

Shapes: X (T, in) with T = tokens, S (out, in) as CSR (crow int32 (out+1,), col int16/int32 (nnz,),
values fp32 (nnz,)), Y (T, out).

CPU (`csr_matmul_cpu`): one numba kernel, multi-threaded with `prange` over (token tile × row chunk)
tasks. A task copies its tile of X transposed into a local (in, TILE) buffer (128 KiB for in = 512,
so it stays in L2), then for every output row of its chunk accumulates

    acc[:nt] += v · buf[col, :nt]      over the row's links (v, col)

— a contiguous FMA over the tile's tokens that LLVM vectorises, four links per pass (1.1–1.6×
faster than one link per pass: fewer acc loads/stores) — into row i of a local transposed Y tile,
which is finally copied into Y row by row (contiguous writes).
One pass over the CSR per tile; the packing (in·TILE loads) is amortised over every row.
When there are fewer tiles than threads (decoding, short prompts) rows are split into chunks so
every thread has work. Measured alternatives (`benchmarks/kernels.py` history, 2 cores, 512×1376
at 5 % density): 16 register accumulators per row (not vectorised by LLVM: 2–3× slower), a tile of
32 tokens (2× slower), a per-token gathered dot product (5–10× slower at 256+ tokens), torch's CSR
matmul (3–8× slower below 4096 tokens). Tiles of 64–256 tokens were within noise; 64 wins at 256
tokens. The kernel computes in fp32 (numba has no bf16): the CPU runtime keeps S in fp32.

CUDA (`csr_matmul_cuda`): torch's CSR matmul (cuSPARSE). This module imports on machines without
numba or CUDA; `NUMBA_AVAILABLE` says whether the CPU kernel exists.
"""

from __future__ import annotations

import numpy as np
import torch

TILE = 64  # tokens per task of the CPU kernel (see the module docstring for the measurement)

try:  # the CPU sparse backend needs numba, but the package must import without it
    import numba
    from numba import njit, prange

    NUMBA_AVAILABLE = True
except ImportError:  # pragma: no cover - installs without numba
    NUMBA_AVAILABLE = False


if NUMBA_AVAILABLE:

    @njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
    def _csr_tiled(x, crow, col, val, y, n_chunks):  # pragma: no cover - compiled by numba
        """y[t, i] = Σ_{k in row i} val[k] · x[t, col[k]]; x (T, in) fp32, y (T, out) fp32."""
        n_tok, n_in = x.shape
        n_out = crow.shape[0] - 1
        n_tiles = (n_tok + TILE - 1) // TILE
        rows_per_chunk = (n_out + n_chunks - 1) // n_chunks
        for task in prange(n_tiles * n_chunks):
            tile = task // n_chunks
            chunk = task % n_chunks
            t0 = tile * TILE
            nt = min(TILE, n_tok - t0)
            i0 = chunk * rows_per_chunk
            i1 = min(n_out, i0 + rows_per_chunk)
            buf = np.empty((n_in, nt), dtype=np.float32)  # the tile of X, transposed
            for u in range(nt):
                for j in range(n_in):
                    buf[j, u] = x[t0 + u, j]
            ybuf = np.empty((max(i1 - i0, 0), nt), dtype=np.float32)  # the tile of Y, transposed
            for i in range(i0, i1):
                acc = ybuf[i - i0]
                for u in range(nt):
                    acc[u] = 0.0
                k, end = crow[i], crow[i + 1]
                while k + 3 < end:  # four links per pass: a quarter of the acc loads/stores
                    v0, j0 = val[k], np.int64(col[k])
                    v1, j1 = val[k + 1], np.int64(col[k + 1])
                    v2, j2 = val[k + 2], np.int64(col[k + 2])
                    v3, j3 = val[k + 3], np.int64(col[k + 3])
                    for u in range(nt):
                        acc[u] += (v0 * buf[j0, u] + v1 * buf[j1, u]) + (v2 * buf[j2, u] + v3 * buf[j3, u])
                    k += 4
                while k < end:
                    v0, j0 = val[k], np.int64(col[k])
                    for u in range(nt):
                        acc[u] += v0 * buf[j0, u]
                    k += 1
            # Y rows written contiguously: scattering acc straight into column i of Y strides by
            # out·4 bytes, which maps a tile's rows onto a few L1 sets (1.3–1.5× slower at 4096 tokens).
            for u in range(nt):
                for i in range(i0, i1):
                    y[t0 + u, i] = ybuf[i - i0, u]


def set_threads(n: int | None = None) -> None:
    """Uses `n` (default: torch's intra-op thread count) threads in the numba kernel."""
    n = n or torch.get_num_threads()
    if NUMBA_AVAILABLE:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        torch.set_num_threads(n)  # starting numba's OpenMP pool can reset the OpenMP default torch reads


def csr_matmul_cpu(
    x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`X Sᵀ` on CPU: x (T, in) fp32 → (T, out) fp32, S given as a CSR triple (out rows).

    `out`, if given, is a contiguous (T, out) fp32 tensor the result is written into.
    """
    if not NUMBA_AVAILABLE:
        raise RuntimeError("the CPU sparse kernel needs numba (pip install numba)")
    if x.dtype != torch.float32 or values.dtype != torch.float32:
        raise TypeError(f"csr_matmul_cpu computes in float32, got x {x.dtype} and values {values.dtype}")
    x = x.contiguous()
    n_tok, n_out = x.shape[0], crow.numel() - 1
    y = torch.empty(n_tok, n_out, dtype=torch.float32) if out is None else out
    if n_tok == 0 or n_out == 0:
        return y.zero_()
    threads = numba.get_num_threads()
    n_tiles = -(-n_tok // TILE)
    n_chunks = max(1, -(-2 * threads // n_tiles)) if n_tiles < threads else 1
    _csr_tiled(x.numpy(), crow.numpy(), col.numpy(), values.numpy(), y.numpy(), n_chunks)
    return y


def csr_matmul_cuda(x: torch.Tensor, csr: torch.Tensor) -> torch.Tensor:
    """`X Sᵀ` on CUDA with cuSPARSE: x (T, in), csr a (out, in) `torch.sparse_csr_tensor` → (T, out)."""
    return (csr @ x.t()).t()


def csr_matmul_reference(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                         n_in: int) -> torch.Tensor:
    """`X Sᵀ` through a densified S (for tests): x (T, in) → (T, out)."""
    n_out = crow.numel() - 1
    counts = (crow[1:] - crow[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(n_out), counts)
    w = torch.zeros(n_out, n_in, dtype=values.dtype)
    w[rows, col.long()] = values
    return x @ w.t()
