"""Sparse-times-dense kernels for the sparse branch `Y = X Sᵀ` (S in CSR, X dense).

Shapes: X (T, in) with T = tokens, S (out, in) as CSR (crow int32 (out+1,), col int16/int32 (nnz,),
values fp32 (nnz,)), Y (T, out).

CPU (`csr_matmul_cpu`): one numba kernel, multi-threaded with `prange` over (token tile × row chunk)
tasks. A task copies its tile of X transposed into a local (in, nt) buffer (256 KiB for in = 512 and
128 tokens, so it stays in L2; tiles of 64 tokens once in > 2048), then for every output row of its
chunk accumulates

    acc[:nt] += v · buf[col, :nt]      over the row's links (v, col)

— a contiguous FMA over the tile's tokens that LLVM vectorises, four links per pass (fewer acc
loads/stores; eight per pass measured the same) — into row i of a local transposed Y tile, which
is finally copied into Y. For full tiles the token count is a compile-time constant, so LLVM
unrolls the token loop completely (1.1–1.15× faster than a loop bounded by nt). Both transposes go
in small blocks: X in 8×8 blocks (2–3× faster than copying one token at a time), Y eight tokens
at a time in 8 × 16-column blocks, so the writes stream through eight rows of Y in whole 64-byte
lines (about 1.5× faster than writing Y row by row from the strided tile). At 4096 tokens the two
copies are still 30–50 % of the time, the FMAs the rest (about one 8-wide FMA per cycle: LLVM
picks 256-bit vectors for this CPU family, and an L1-resident tile is only 25 % faster).
One pass over the CSR per tile; the packing (in·nt loads) is amortised over every row.
When there are fewer tiles than threads (decoding, short prompts) rows are split into chunks so
every thread has work. Measured alternatives (60M shapes at 5 % density, 256 and 4096 tokens):
16 register accumulators per row (not vectorised by LLVM: 2–3× slower); tiles of 16 or 32 tokens
(1.9–2.5× slower FMA part: per-link overhead); a tree of partial sums instead of the FMA chain,
8 links per pass, 16-token blocks for either copy (all within noise); torch for the transposes
(`x.t().contiguous()`: 2–14 ms at 4096 tokens, slower than the blocked copies); writing each
16-row block of Y right after computing it (up to 1.3× slower at 4096 tokens); a C++ kernel with
AVX-512 register accumulators (`load_inline`: only 1.1–1.3× faster, not worth a compiler at run
time); a per-token gathered dot product (5–10× slower at 256+ tokens); torch's CSR matmul (3–8×
slower below 4096 tokens). The kernel computes in fp32 (numba has no bf16): the CPU runtime keeps
S in fp32.

CUDA (`csr_matmul_cuda`): torch's CSR matmul (cuSPARSE). This module imports on machines without
numba or CUDA; `NUMBA_AVAILABLE` says whether the CPU kernel exists.
"""

from __future__ import annotations

import numpy as np
import torch

TILE = 128  # tokens per task of the CPU kernel (see the module docstring for the measurement) ...
TILE_BYTES = 1 << 20  # ... halved while a transposed tile of X (in × TILE fp32) would exceed this share of L2

try:  # the CPU sparse backend needs numba, but the package must import without it
    import numba
    from numba import njit, prange

    NUMBA_AVAILABLE = True
except ImportError:  # pragma: no cover - installs without numba
    NUMBA_AVAILABLE = False


if NUMBA_AVAILABLE:

    @njit(inline="always", fastmath=True, error_model="numpy")
    def _pack(x, t0, nt, buf):  # pragma: no cover - compiled by numba
        """buf[j, u] = x[t0 + u, j] for u < nt, in 8×8 blocks (2–3× faster than token by token)."""
        n_in = x.shape[1]
        j_full, u_full = n_in - n_in % 8, nt - nt % 8
        for jb in range(0, j_full, 8):
            for ub in range(0, u_full, 8):
                for jj in range(8):
                    for uu in range(8):
                        buf[jb + jj, ub + uu] = x[t0 + ub + uu, jb + jj]
            for u in range(u_full, nt):
                for jj in range(8):
                    buf[jb + jj, u] = x[t0 + u, jb + jj]
        for j in range(j_full, n_in):
            for u in range(nt):
                buf[j, u] = x[t0 + u, j]

    @njit(inline="always", fastmath=True, error_model="numpy")
    def _row(crow, col, val, buf, i, acc, width):  # pragma: no cover - compiled by numba
        """acc[:width] = Σ_{k in row i} val[k] · buf[col[k], :width]."""
        for u in range(width):
            acc[u] = 0.0
        k, end = crow[i], crow[i + 1]
        while k + 3 < end:  # four links per pass: a quarter of the acc loads/stores
            v0, j0 = val[k], np.int64(col[k])
            v1, j1 = val[k + 1], np.int64(col[k + 1])
            v2, j2 = val[k + 2], np.int64(col[k + 2])
            v3, j3 = val[k + 3], np.int64(col[k + 3])
            for u in range(width):
                acc[u] += (v0 * buf[j0, u] + v1 * buf[j1, u]) + (v2 * buf[j2, u] + v3 * buf[j3, u])
            k += 4
        while k < end:
            v0, j0 = val[k], np.int64(col[k])
            for u in range(width):
                acc[u] += v0 * buf[j0, u]
            k += 1

    @njit(inline="always", fastmath=True, error_model="numpy")
    def _unpack(ybuf, y, t0, nt, i0, i1):  # pragma: no cover - compiled by numba
        """y[t0 + u, i0 + i] = ybuf[i, u]: 8 rows of Y at a time, filled in blocks of 8 × 16 columns."""
        n = i1 - i0
        i_full = n - n % 16
        for ub in range(0, nt, 8):
            u_end = min(ub + 8, nt)
            for ib in range(0, i_full, 16):
                for u in range(ub, u_end):
                    for ii in range(16):
                        y[t0 + u, i0 + ib + ii] = ybuf[ib + ii, u]
            for u in range(ub, u_end):
                for i in range(i_full, n):
                    y[t0 + u, i0 + i] = ybuf[i, u]

    @njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
    def _csr_tiled(x, crow, col, val, y, tile_size, n_chunks):  # pragma: no cover - compiled by numba
        """y[t, i] = Σ_{k in row i} val[k] · x[t, col[k]]; x (T, in) fp32, y (T, out) fp32."""
        n_tok, n_in = x.shape
        n_out = crow.shape[0] - 1
        n_tiles = (n_tok + tile_size - 1) // tile_size
        rows_per_chunk = (n_out + n_chunks - 1) // n_chunks
        for task in prange(n_tiles * n_chunks):
            tile = task // n_chunks
            chunk = task % n_chunks
            t0 = tile * tile_size
            nt = min(tile_size, n_tok - t0)
            i0 = chunk * rows_per_chunk
            # The last chunks may start past n_out (ceil division): clamp so they are empty,
            # never negative (a negative row count would index Y out of bounds in _unpack).
            i1 = max(i0, min(n_out, i0 + rows_per_chunk))
            buf = np.empty((n_in, nt), dtype=np.float32)  # the tile of X, transposed
            _pack(x, t0, nt, buf)
            ybuf = np.empty((max(i1 - i0, 0), nt), dtype=np.float32)  # the tile of Y, transposed
            for i in range(i0, i1):
                if nt == 128:  # compile-time widths: LLVM unrolls the token loop completely
                    _row(crow, col, val, buf, i, ybuf[i - i0], 128)
                elif nt == 64:
                    _row(crow, col, val, buf, i, ybuf[i - i0], 64)
                else:
                    _row(crow, col, val, buf, i, ybuf[i - i0], nt)
            _unpack(ybuf, y, t0, nt, i0, i1)


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
    tile = TILE
    while tile > 64 and x.shape[1] * tile * 4 > TILE_BYTES:
        tile //= 2
    n_tiles = -(-n_tok // tile)
    n_chunks = max(1, -(-2 * threads // n_tiles)) if n_tiles < threads else 1
    _csr_tiled(x.numpy(), crow.numpy(), col.numpy(), values.numpy(), y.numpy(), tile, n_chunks)
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
