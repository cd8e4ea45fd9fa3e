"""`csr_linear` and `CsrStructure` against a dense masked reference (`F.linear(x, W * mask)` with autograd)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chtsl_infer import kernels
from chtsl_infer.kernels import build
from chtsl_infer.kernels.settings import override, settings
from chtsl_infer.model.csr import CsrStructure, csr_linear, mask_to_csr

RTOL = 1e-5  # fp32: relative to the largest entry of the reference (sums of up to a few hundred products)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """max |actual - expected| ≤ rtol · max |expected| (a relative bound that zero entries cannot break)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * max(scale, 1e-30), f"max error {err:.3g} vs scale {scale:.3g}"


def _mask(out_f: int, in_f: int, density: float, gen: torch.Generator, empty_rows: int = 0,
          empty_cols: int = 0) -> torch.Tensor:
    mask = torch.rand(out_f, in_f, generator=gen) < density
    if empty_rows:
        mask[torch.randperm(out_f, generator=gen)[:empty_rows]] = False
    if empty_cols:
        mask[:, torch.randperm(in_f, generator=gen)[:empty_cols]] = False
    return mask


def _structure(mask: torch.Tensor) -> CsrStructure:
    """The structure of a bool (out, in) mask: value k is the k-th True of `mask.nonzero()`."""
    return CsrStructure.from_crow_col(*mask_to_csr(mask), mask.shape[1])


def _reference(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, dy: torch.Tensor):
    """(y, dx, dW[mask]) of the dense masked layer."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = F.linear(x, w * mask)
    y.backward(dy)
    return y.detach(), x.grad, w.grad[mask]


def _check(lead: tuple[int, ...], out_f: int, in_f: int, density: float, seed: int, empty_rows: int = 0,
           empty_cols: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    mask = _mask(out_f, in_f, density, gen, empty_rows, empty_cols)
    w = torch.randn(out_f, in_f, generator=gen)
    x = torch.randn(*lead, in_f, generator=gen)
    dy = torch.randn(*lead, out_f, generator=gen)
    st = _structure(mask)
    values = w[mask].clone().requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    y = csr_linear(xs, values, st)
    y.backward(dy)
    y_ref, dx_ref, dv_ref = _reference(x, w, mask, dy)
    _assert_close(y.detach(), y_ref)
    _assert_close(xs.grad, dx_ref)
    _assert_close(values.grad, dv_ref)


@pytest.mark.parametrize(
    ("lead", "out_f", "in_f", "density", "empty_rows", "empty_cols"),
    [
        ((7,), 33, 50, 0.3, 3, 4),  # odd, rectangular, empty rows and columns
        ((1,), 40, 24, 0.2, 0, 0),  # one token
        ((2, 5), 24, 40, 0.25, 2, 2),  # 3-D input
        ((3, 2, 4), 17, 9, 0.5, 1, 1),  # 4-D input
        ((64,), 96, 128, 0.05, 5, 5),  # training-like density
        ((67,), 70, 120, 0.02, 20, 10),  # very sparse
        ((5,), 16, 16, 1.0, 3, 0),  # fully dense rows next to empty ones
        ((300,), 48, 80, 0.1, 0, 0),  # many tokens
    ],
)
def test_csr_linear_matches_dense_masked(lead, out_f, in_f, density, empty_rows, empty_cols) -> None:
    _check(lead, out_f, in_f, density, seed=out_f * 100 + in_f, empty_rows=empty_rows, empty_cols=empty_cols)


def test_no_links_and_no_tokens() -> None:
    st = _structure(torch.zeros(6, 5, dtype=torch.bool))
    values = torch.zeros(0, requires_grad=True)
    x = torch.randn(4, 5, requires_grad=True)
    y = csr_linear(x, values, st)
    assert y.shape == (4, 6) and not y.any()
    y.sum().backward()
    assert values.grad.shape == (0,) and not x.grad.any()
    st = _structure(torch.rand(6, 5) < 0.5)
    values = torch.randn(st.nnz, requires_grad=True)
    x = torch.randn(0, 5, requires_grad=True)
    y = csr_linear(x, values, st)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert not values.grad.any() and x.grad.shape == (0, 5)


@pytest.mark.parametrize("shape", [(5, 0), (0, 4), (0, 0)])
def test_degenerate_shapes(shape) -> None:
    """No columns and/or no rows: a zero (…, out) output, zero-size gradients, no kernel errors."""
    st = _structure(torch.zeros(*shape, dtype=torch.bool))
    x = torch.randn(2, 3, shape[1], requires_grad=True)
    values = torch.zeros(0, requires_grad=True)
    y = csr_linear(x, values, st)
    assert y.shape == (2, 3, shape[0]) and not y.any()
    y.sum().backward()
    assert x.grad.shape == x.shape and not x.grad.any() and values.grad.shape == (0,)


def test_x_without_grad_and_values_without_grad() -> None:
    gen = torch.Generator().manual_seed(3)
    mask = _mask(20, 30, 0.2, gen)
    st = _structure(mask)
    w = torch.randn(20, 30, generator=gen)
    x, dy = torch.randn(9, 30, generator=gen), torch.randn(9, 20, generator=gen)
    _, dx_ref, dv_ref = _reference(x, w, mask, dy)
    values = w[mask].clone().requires_grad_(True)
    csr_linear(x, values, st).backward(dy)  # x is a plain tensor: only dvalues
    _assert_close(values.grad, dv_ref)
    xs = x.clone().requires_grad_(True)
    csr_linear(xs, w[mask], st).backward(dy)  # frozen values: only dx
    _assert_close(xs.grad, dx_ref)


def test_non_contiguous_input() -> None:
    gen = torch.Generator().manual_seed(4)
    mask = _mask(24, 32, 0.2, gen)
    st = _structure(mask)
    w = torch.randn(24, 32, generator=gen)
    base = torch.randn(32, 11, generator=gen)
    x = base.t()  # (11, 32), column-major
    dy = torch.randn(11, 24, generator=gen)
    y_ref, dx_ref, dv_ref = _reference(x, w, mask, dy)
    values = w[mask].clone().requires_grad_(True)
    xs = base.clone().requires_grad_(True)
    y = csr_linear(xs.t(), values, st)
    y.backward(dy)
    _assert_close(y.detach(), y_ref)
    _assert_close(xs.grad.t(), dx_ref)
    _assert_close(values.grad, dv_ref)


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(5)
    mask = _mask(5, 7, 0.4, gen, empty_rows=1, empty_cols=1)
    st = _structure(mask)
    x = torch.randn(3, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    values = torch.randn(st.nnz, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, v: csr_linear(a, v, st), (x, values))


def test_autocast_bf16_keeps_dtypes_and_fp32_accuracy() -> None:
    """Under bf16 autocast: computed in fp32, y/dx in x's dtype, dvalues in the values' dtype."""
    gen = torch.Generator().manual_seed(6)
    mask = _mask(32, 48, 0.2, gen)
    st = _structure(mask)
    w = torch.randn(32, 48, generator=gen)
    x = torch.randn(10, 48, generator=gen).to(torch.bfloat16)
    dy = torch.randn(10, 32, generator=gen)
    y_ref, dx_ref, dv_ref = _reference(x.float(), w, mask, dy)
    values = w[mask].clone().requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = csr_linear(xs, values, st)
    assert y.dtype == torch.bfloat16
    y.backward(dy.to(torch.bfloat16))
    assert xs.grad.dtype == torch.bfloat16 and values.grad.dtype == torch.float32
    _assert_close(y.detach().float(), y_ref, rtol=1e-2)  # only the final rounding to bf16
    _assert_close(xs.grad.float(), dx_ref, rtol=1e-2)
    # dvalues from a bf16 dy: the reference uses the same rounded dy, so fp32 accuracy holds
    _, _, dv_ref16 = _reference(x.float(), w, mask, dy.to(torch.bfloat16).float())
    _assert_close(values.grad, dv_ref16)


def test_structure_round_trip_and_transpose() -> None:
    gen = torch.Generator().manual_seed(7)
    mask = _mask(13, 9, 0.3, gen, empty_rows=2, empty_cols=2)
    st = _structure(mask)
    assert st.nnz == int(mask.sum()) and st.n_rows == 13 and st.n_cols == 9
    assert torch.equal(st.to_mask(), mask)
    rows, cols = mask.nonzero(as_tuple=True)
    assert torch.equal(st.row_indices(), rows) and torch.equal(st.col.long(), cols)
    assert all(t.dtype == torch.int32 for t in (st.crow, st.col, st.t_crow, st.t_row, st.t_perm))
    # the transposed structure is the CSR of mask.t(), and t_perm maps its entries to value indices
    tst = _structure(mask.t().contiguous())
    assert torch.equal(st.t_crow, tst.crow) and torch.equal(st.t_row, tst.col)
    values = torch.randn(st.nnz, generator=gen)
    w = torch.zeros(13, 9)
    w[mask] = values
    assert torch.equal(values[st.t_perm.long()], w.t()[mask.t()])
    again = CsrStructure.from_crow_col(st.crow, st.col, 9)
    for name in ("crow", "col", "t_crow", "t_row", "t_perm"):
        assert torch.equal(getattr(again, name), getattr(st, name))
    moved = st.to("cpu")
    assert torch.equal(moved.to_mask(), mask)
    crow, col = mask_to_csr(mask)  # the stored layout: int32 row pointers, int16 columns while they fit
    assert crow.dtype == torch.int32 and col.dtype == torch.int16
    assert mask_to_csr(torch.zeros(2, 40000, dtype=torch.bool))[1].dtype == torch.int32


@pytest.mark.parametrize(
    ("crow", "col", "n_cols", "message"),
    [
        ([1, 2, 3], [0, 1], 4, "start at 0"),
        ([0, 2, 1, 3], [0, 1, 2], 4, "decrease at row 1"),
        ([0, 1, 3], [0, 1], 4, "end at 3 but there are 2"),
        ([0, 1, 2], [0, 4], 4, "out of range"),
        ([0, 1, 2], [-1, 0], 4, "out of range"),
        ([0, 2, 2], [2, 1], 4, "row 0 are not strictly ascending"),
        ([0, 1, 3], [0, 2, 2], 4, "row 1 are not strictly ascending"),
        ([[0, 1]], [0], 4, "1-D"),
        ([0.0, 1.0], [0], 4, "integers"),
    ],
)
def test_from_crow_col_rejects_corrupt_indices(crow, col, n_cols, message) -> None:
    with pytest.raises(ValueError, match=message) as info:
        CsrStructure.from_crow_col(torch.tensor(crow), torch.tensor(col), n_cols)
    assert "\n" not in str(info.value)


def test_from_crow_col_accepts_int16_columns_and_empty_rows() -> None:
    st = CsrStructure.from_crow_col(torch.tensor([0, 0, 2, 2, 3], dtype=torch.int32),
                                    torch.tensor([1, 3, 0], dtype=torch.int16), 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, 1] = expected[1, 3] = expected[3, 0] = True
    assert torch.equal(st.to_mask(), expected)


def test_shape_errors() -> None:
    st = _structure(torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="features"):
        csr_linear(torch.randn(2, 5), torch.randn(12), st)
    with pytest.raises(ValueError, match="values must have shape"):
        csr_linear(torch.randn(2, 4), torch.randn(11), st)


def test_torch_kernels_match_reference() -> None:
    """The torch sparse-op path (the CUDA path and the CPU fallback), called directly."""
    gen = torch.Generator().manual_seed(8)
    mask = _mask(30, 21, 0.3, gen, empty_rows=3, empty_cols=3)
    st = _structure(mask)
    w = torch.randn(30, 21, generator=gen) * mask
    x, dy = torch.randn(13, 21, generator=gen), torch.randn(13, 30, generator=gen)
    values = w[mask]
    _assert_close(kernels.csr_mm_torch(x, st.crow, st.col, values, 30), x @ w.t())
    _assert_close(kernels.csr_mm_torch(dy, st.t_crow, st.t_row, values[st.t_perm.long()], 21), dy @ w)
    _assert_close(kernels.csr_sddmm_torch(dy, x, st.crow, st.col, 21), (dy.t() @ x)[mask])


def test_compiled_training_kernels_are_in_use() -> None:
    """CI machines have a C compiler: the float32 CPU path of csr_linear runs the C kernels."""
    ok, how = kernels.cpu_kernel_status()
    assert ok, how
    assert kernels.cpu_kernel("csr_mm_tm", torch.zeros(1), torch.zeros(1)) is not None
    assert kernels.cpu_kernel("csr_mm_tm", torch.zeros(1, dtype=torch.float64)) is None
    assert kernels.cpu_kernel("csr_mm_tm", torch.zeros(1), torch.zeros(1, dtype=torch.float64)) is None


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    ("tokens", "out_f", "in_f", "density", "tile_bytes"),
    [
        (1, 37, 29, 0.3, None),  # one token: tile 16, row chunks
        (5, 8, 8, 1.0, None),  # fully dense 8 × 8: one full transpose block
        (16, 20, 24, 0.4, None),  # exactly one 16-token tile
        (29, 61, 43, 0.2, None),  # one partial 32-token tile; rows and features not multiples of 8
        (64, 96, 80, 0.15, None),  # exactly one 64-token tile
        (131, 70, 120, 0.05, None),  # two full tiles and a 3-token tail
        (200, 33, 19, 0.6, None),  # SDDMM: 64-token tiles and an 8-token tail, 8-link groups and tails
        (300, 130, 41, 0.3, 1),  # SDDMM forced to 32-token tiles; more rows per thread than a row chunk (64)
        (100, 200, 1100, 0.02, None),  # wide input: SDDMM takes 32-token tiles by itself
        (70, 9, 300, 0.1, None),  # few rows, many columns: rows with ≥ 8 links on the transpose
    ],
)
def test_compiled_kernels_match_reference(tokens, out_f, in_f, density, tile_bytes, threads, kernel_variant) -> None:
    """csr_mm (forward and transposed) and csr_sddmm on every tile/tail/chunk path vs dense fp32."""
    gen = torch.Generator().manual_seed(tokens + out_f + in_f)
    mask = _mask(out_f, in_f, density, gen, empty_rows=out_f // 7, empty_cols=in_f // 9)
    st = _structure(mask)
    w = torch.randn(out_f, in_f, generator=gen) * mask
    x, dy = torch.randn(tokens, in_f, generator=gen), torch.randn(tokens, out_f, generator=gen)
    values = w[mask]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with override(sddmm_tile_bytes=tile_bytes or settings().sddmm_tile_bytes):
            y = kernels.csr_mm(x, st.crow, st.col, values, out_f)
            dx = kernels.csr_mm(dy, st.t_crow, st.t_row, values[st.t_perm.long()], in_f)
            dv = kernels.csr_sddmm(dy, x, st.crow, st.col, in_f)
    finally:
        torch.set_num_threads(saved)
    x64, dy64, w64 = x.double(), dy.double(), w.double()
    _assert_close(y.double(), x64 @ w64.t())
    _assert_close(dx.double(), dy64 @ w64)
    _assert_close(dv.double(), (dy64.t() @ x64)[mask])


def test_compiled_kernels_read_strided_inputs() -> None:
    """Row-strided views are read in place; column-strided (transposed) views are copied first."""
    gen = torch.Generator().manual_seed(9)
    mask = _mask(40, 30, 0.2, gen)
    st = _structure(mask)
    w = torch.randn(40, 30, generator=gen) * mask
    wide_x, wide_dy = torch.randn(50, 45, generator=gen), torch.randn(50, 47, generator=gen)
    x, dy = wide_x[::2, 5:35], wide_dy[1::2, 3:43]  # (25, 30) and (25, 40), rows at a stride
    xt = torch.randn(30, 25, generator=gen).t()  # (25, 30), column-major
    for xi in (x, xt):
        _assert_close(kernels.csr_mm(xi, st.crow, st.col, w[mask], 40), xi @ w.t())
        _assert_close(kernels.csr_sddmm(dy, xi, st.crow, st.col, 30), (dy.t() @ xi)[mask])
    _assert_close(kernels.csr_mm(dy, st.t_crow, st.t_row, w[mask][st.t_perm.long()], 30), dy @ w)


@pytest.mark.parametrize(("lead", "out_f", "in_f"), [((7,), 33, 50), ((2, 3), 24, 40), ((1,), 5, 3)])
def test_csr_linear_without_compiler_uses_torch_ops(lead, out_f, in_f, no_compiled_kernels) -> None:
    """No C compiler: the same results through torch's sparse CSR ops (the CUDA code path, on CPU)."""
    assert kernels.cpu_kernel("csr_mm_tm", torch.zeros(1)) is None
    _check(lead, out_f, in_f, 0.3, seed=out_f, empty_rows=2, empty_cols=2)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(("lead", "out_f", "in_f", "density"), [((300,), 96, 130, 0.05), ((2, 7), 33, 50, 0.3),
                                                                 ((1,), 8, 5, 0.5)])
def test_csr_linear_cuda_matches_dense_masked(lead, out_f, in_f, density) -> None:
    """On CUDA: cuSPARSE SpMM (forward, dx) and SDDMM (dvalues) vs the dense masked layer on the GPU."""
    gen = torch.Generator().manual_seed(out_f)
    mask = _mask(out_f, in_f, density, gen, empty_rows=2, empty_cols=2)
    st = _structure(mask.cuda())
    assert st.crow.is_cuda and torch.equal(st.to("cpu").to_mask(), mask)
    w = torch.randn(out_f, in_f, generator=gen).cuda()
    x = torch.randn(*lead, in_f, generator=gen).cuda()
    dy = torch.randn(*lead, out_f, generator=gen).cuda()
    values = w[mask.cuda()].clone().requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    y = csr_linear(xs, values, st)
    y.backward(dy)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in full fp32
    try:
        y_ref, dx_ref, dv_ref = _reference(x, w, mask.cuda(), dy)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    _assert_close(y.detach(), y_ref)
    _assert_close(xs.grad, dx_ref)
    _assert_close(values.grad, dv_ref)


@pytest.mark.cuda
@needs_cuda
def test_csr_linear_cuda_autocast_bf16() -> None:
    gen = torch.Generator().manual_seed(11)
    mask = _mask(64, 48, 0.2, gen)
    st = _structure(mask).to("cuda")
    w = torch.randn(64, 48, generator=gen)
    x = torch.randn(10, 48, generator=gen)
    y_ref, _, _ = _reference(x, w, mask, torch.zeros(10, 64))
    values = w[mask].cuda().requires_grad_(True)
    xs = x.cuda().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = csr_linear(xs, values, st)
    assert y.dtype == torch.float32  # an fp32 x stays fp32: csr_linear is not an autocast-cast op
    y.sum().backward()
    assert values.grad.dtype == torch.float32 and xs.grad.dtype == torch.float32
    _assert_close(y.detach().cpu(), y_ref)


def test_transpose_counting_sort_matches_argsort(monkeypatch) -> None:
    """The compiled counting-sort transpose equals the torch (stable argsort) one, also with empty rows/cols."""
    gen = torch.Generator().manual_seed(12)
    mask = _mask(37, 23, 0.2, gen, empty_rows=4, empty_cols=3)
    st = _structure(mask)
    compiled = kernels.csr_transpose(st.crow, st.col, 23)
    monkeypatch.setattr(build, "library", lambda: (None, "no compiler (test)"))
    fallback = kernels.csr_transpose(st.crow, st.col, 23)
    for a, b in zip(compiled, fallback, strict=True):
        assert a.dtype == b.dtype == torch.int32 and torch.equal(a, b)
    empty = _structure(torch.zeros(3, 4, dtype=torch.bool))
    assert empty.nnz == 0 and torch.equal(empty.t_crow, torch.zeros(5, dtype=torch.int32))


@pytest.mark.parametrize("compiled", [True, False])
def test_no_dense_weight_sized_tensor_is_created(compiled, monkeypatch) -> None:
    """Forward + backward create no strided float tensor as large as S (out × in): watched op by op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if not compiled:
        monkeypatch.setattr(build, "library", lambda: (None, "no compiler (test)"))
    out_f, in_f, tokens = 64, 96, 3  # out × in = 6144 floats; activations ≤ 3 × 96, nnz ≈ 600
    largest: list[int] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.is_floating_point():
                    largest.append(t.numel())
            return result

    gen = torch.Generator().manual_seed(13)
    st = _structure(_mask(out_f, in_f, 0.1, gen))
    values = torch.randn(st.nnz, generator=gen, requires_grad=True)
    x = torch.randn(tokens, in_f, generator=gen, requires_grad=True)
    with Watch():
        csr_linear(x, values, st).sum().backward()
    assert largest and max(largest) < out_f * in_f // 4, max(largest)
    assert values.grad is not None and x.grad is not None
