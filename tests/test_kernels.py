"""The CSR×dense kernels against a dense-masked matmul (random shapes, densities, empty rows)."""

from __future__ import annotations

import pytest
import torch

from chtsl_infer import kernels

pytestmark = pytest.mark.skipif(not kernels.NUMBA_AVAILABLE, reason="numba not installed")


def _random_csr(out_f: int, in_f: int, density: float, gen: torch.Generator, empty_rows: int = 0,
                col_dtype: torch.dtype = torch.int16) -> tuple[torch.Tensor, ...]:
    """(crow int32, col, values fp32, dense S) with `empty_rows` rows forced empty."""
    mask = torch.rand(out_f, in_f, generator=gen) < density
    if empty_rows:
        mask[torch.randperm(out_f, generator=gen)[:empty_rows]] = False
    w = torch.randn(out_f, in_f, generator=gen) * mask
    rows, cols = mask.nonzero(as_tuple=True)
    crow = torch.zeros(out_f + 1, dtype=torch.int64)
    crow[1:] = mask.sum(1).cumsum(0)
    return crow.to(torch.int32), cols.to(col_dtype), w[rows, cols].contiguous(), w


@pytest.mark.parametrize(
    ("tokens", "out_f", "in_f", "density", "empty_rows"),
    [
        (1, 96, 64, 0.05, 10),  # decoding: one token, row-chunk parallelism
        (7, 33, 50, 0.3, 5),  # fewer tokens than a tile, odd shapes
        (kernels.TILE, 128, 80, 0.1, 0),  # exactly one tile
        (kernels.TILE + 3, 70, 120, 0.02, 20),  # a full tile and a 3-token tail; very sparse
        (300, 200, 130, 0.5, 0),  # several tiles, half dense
        (5, 40, 30, 0.0, 0),  # no links at all: Y = 0
        (20, 16, 16, 1.0, 3),  # fully dense rows next to empty ones
        (150, 40, 2100, 0.01, 4),  # wide input: halved tiles (a full one and a 22-token tail)
        (1, 1, 1, 1.0, 0),  # 1×1: more row chunks than rows
        (3, 5, 9, 0.5, 0),  # row chunks of 2 over 5 rows: the last chunk starts past the end
    ],
)
def test_kernel_matches_dense_masked_matmul(tokens: int, out_f: int, in_f: int, density: float,
                                            empty_rows: int) -> None:
    gen = torch.Generator().manual_seed(tokens * 1000 + out_f)
    crow, col, val, w = _random_csr(out_f, in_f, density, gen, empty_rows)
    x = torch.randn(tokens, in_f, generator=gen)
    kernels.set_threads(2)  # row chunking (few tokens) depends on the thread count
    try:
        y = kernels.csr_matmul_cpu(x, crow, col, val)
    finally:
        kernels.set_threads()
    assert y.shape == (tokens, out_f)
    torch.testing.assert_close(y, x @ w.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernels.csr_matmul_reference(x, crow, col, val, in_f), x @ w.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_thread_counts_agree(threads: int) -> None:
    gen = torch.Generator().manual_seed(1)
    crow, col, val, w = _random_csr(257, 190, 0.05, gen, empty_rows=7)
    x = torch.randn(150, 190, generator=gen)
    kernels.set_threads(threads)
    try:
        torch.testing.assert_close(kernels.csr_matmul_cpu(x, crow, col, val), x @ w.t(), atol=1e-5, rtol=1e-5)
    finally:
        kernels.set_threads()


def test_kernel_int32_columns_and_out_buffer() -> None:
    gen = torch.Generator().manual_seed(2)
    crow, col, val, w = _random_csr(50, 70, 0.2, gen, col_dtype=torch.int32)
    x = torch.randn(9, 70, generator=gen)
    out = torch.full((9, 50), float("nan"))
    y = kernels.csr_matmul_cpu(x, crow, col, val, out=out)
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, x @ w.t(), atol=1e-5, rtol=1e-5)


def test_kernel_non_contiguous_input_and_zero_tokens() -> None:
    gen = torch.Generator().manual_seed(3)
    crow, col, val, w = _random_csr(24, 40, 0.3, gen)
    x = torch.randn(40, 11, generator=gen).t()  # (11, 40), not contiguous
    torch.testing.assert_close(kernels.csr_matmul_cpu(x, crow, col, val), x @ w.t(), atol=1e-5, rtol=1e-5)
    assert kernels.csr_matmul_cpu(torch.zeros(0, 40), crow, col, val).shape == (0, 24)


def test_kernel_rejects_non_fp32() -> None:
    gen = torch.Generator().manual_seed(4)
    crow, col, val, _ = _random_csr(8, 8, 0.5, gen)
    with pytest.raises(TypeError, match="float32"):
        kernels.csr_matmul_cpu(torch.randn(2, 8, dtype=torch.float64), crow, col, val)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_csr_matches_dense() -> None:  # pragma: no cover - GPU machines only
    gen = torch.Generator().manual_seed(5)
    crow, col, val, w = _random_csr(300, 200, 0.05, gen, empty_rows=9)
    csr = torch.sparse_csr_tensor(crow, col.int(), val, size=(300, 200)).cuda()
    x = torch.randn(77, 200, generator=gen)
    torch.testing.assert_close(kernels.csr_matmul_cuda(x.cuda(), csr).cpu(), x @ w.t(), atol=1e-4, rtol=1e-4)
