"""The packed format 2 encodings (int8 rows, 8-bit column deltas) and the kernels that read them, each
against a float64 reference computed from the dequantized weights (exact up to fp32 summation order)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chtsl_infer import kernels
from chtsl_infer.formats.encoding import (
    delta_decode,
    delta_encode,
    dequantize_csr,
    dequantize_rows,
    quantize_csr,
    quantize_rows,
    row_of_links,
)
from chtsl_infer.kernels.settings import override
from chtsl_infer.kernels.sparse import absolute_columns
from tests.conftest import ALL_METHODS, assert_one_call_equals_the_block_loop, random_ids, tiny_model_nonzero_b

ROOT = Path(__file__).resolve().parents[1]
F32, BF16, I8 = torch.float32, torch.bfloat16, torch.int8
INDEXES = (torch.int16, torch.int32, torch.uint8)


def _require_kernels() -> None:
    if not kernels.cpu_kernel_status()[0]:
        pytest.skip(f"no compiled kernels: {kernels.cpu_kernel_status()[1]}")


def _csr(n_out: int, n_in: int, density: float, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(crow int32, col int32, values fp32) of a random mask with empty rows, a full row, a row whose only
    link is column 0 and rows with gaps over 255 (when n_in allows)."""
    mask = torch.rand(n_out, n_in, generator=gen) < density
    mask[1] = False  # empty
    mask[2] = True  # full: deltas of 1
    mask[3] = False
    mask[3, 0] = True  # a first delta of 0
    if n_in > 600:
        mask[4] = False
        mask[4, [5, 600, n_in - 1]] = True  # gaps of 595 and more: padding links
        mask[5] = False
        mask[5, [255, 510, 511]] = True  # a first gap of exactly 255, then 255 again, then 1
    crow = torch.zeros(n_out + 1, dtype=torch.int32)
    crow[1:] = mask.sum(1).cumsum(0)
    return crow, mask.nonzero()[:, 1].to(torch.int32), torch.randn(int(mask.sum()), generator=gen)


def _encode(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, dtype: torch.dtype, index: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The CSR with `dtype` values and `index` columns: (crow, col, values, scale, dequantized fp64 values)."""
    scale = None
    if dtype == I8:
        values, scale = quantize_csr(crow, values)
        exact = dequantize_csr(crow, values, scale, torch.float64)
    else:
        values = values.to(dtype)
        exact = values.double()
    if index == torch.uint8:
        exact = delta_encode(crow, col, exact)[2]  # zeros at the padding links
        crow, col, values = delta_encode(crow, col, values)
    else:
        col = col.to(index)
    return crow, col, values, scale, exact


def _dense(crow: torch.Tensor, col: torch.Tensor, exact: torch.Tensor, n_in: int) -> torch.Tensor:
    """S (out, in) in float64 from a CSR of any column encoding (padding links add their zeros)."""
    w = torch.zeros(crow.numel() - 1, n_in, dtype=torch.float64)
    w.index_put_((row_of_links(crow), absolute_columns(crow, col)), exact, accumulate=True)
    return w


# --- the encodings ------------------------------------------------------------------------------------

def test_delta_encoding_round_trip_with_gaps_and_empty_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    crow, col, values = _csr(40, 2000, 0.002, gen)
    new_crow, delta, padded = delta_encode(crow, col, values)
    assert delta.dtype == torch.uint8 and new_crow.dtype == torch.int32 and padded.numel() == delta.numel()
    assert int(new_crow[-1]) == delta.numel() > col.numel()  # padding links, counted by the row pointers
    absolute = absolute_columns(new_crow, delta)
    real = padded != 0
    assert torch.equal(absolute[real], col.long()) and torch.equal(padded[real], values)
    assert torch.equal(row_of_links(new_crow)[real], row_of_links(crow))
    rows = row_of_links(new_crow)
    later = torch.ones_like(rows, dtype=torch.bool)
    later[new_crow[:-1].long()[new_crow[1:] > new_crow[:-1]]] = False
    assert bool((delta[later] >= 1).all()) and int((delta[~real] != 255).sum()) == 0  # pads are full steps
    counts = (new_crow[1:] - new_crow[:-1]).tolist()
    assert counts[1] == 0 and counts[3] == 1 and delta[new_crow[3]] == 0  # empty row; a first column of 0
    assert counts[4] == 3 + (595 - 1) // 255 + (2000 - 1 - 600 - 1) // 255  # 2 + 5 pads around 3 links
    row5 = delta[new_crow[5]:new_crow[6]].tolist()
    assert row5 == [255, 255, 1]  # 255, 510, 511: no padding needed
    for n_in in (1, 255, 256, 70000):  # one column; gaps of exactly 255 and 256; a wide layer
        c = torch.tensor([0, 2], dtype=torch.int32)
        cols = torch.tensor([0, n_in - 1])
        nc, d, _ = delta_encode(c, cols, torch.ones(2))
        assert absolute_columns(nc, d).tolist()[-1] == n_in - 1 and int(nc[-1]) == 2 + max(0, (n_in - 2) // 255)
    empty = delta_encode(torch.zeros(4, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0))
    assert empty[0].tolist() == [0, 0, 0, 0] and empty[1].numel() == 0
    values[::7] = 0  # explicit zero links (just regrown) stay links
    values[int(crow[5]):int(crow[6])] = torch.tensor([1.0, 0.0, 1.0])  # but a zero 255 columns after a link
    for stored in (values, quantize_csr(crow, values)[0]):
        want = _dense(crow, col, stored.double(), 2000)
        encoded = delta_encode(crow, col, stored)
        back = delta_decode(*encoded, torch.int16)  # by the padding rule alone: that zero link reads as padding
        assert back[1].numel() < col.numel() and back[1].dtype == torch.int16
        assert (back[0][1:] - back[0][:-1]).tolist()[5] == 2 and 510 not in back[1][back[0][5]:back[0][6]].tolist()
        assert torch.equal(_dense(back[0], back[1], back[2].double(), 2000), want)
        back = delta_decode(*encoded, torch.int32, links=col.numel())  # a fixed support size: as many links
        assert back[1].numel() == col.numel() and torch.equal(_dense(back[0], back[1], back[2].double(), 2000), want)
        clean = stored.clone()
        clean[int(crow[5]) + 1] = 1  # no ambiguous zero: the exact CSR back
        back = delta_decode(*delta_encode(crow, col, clean), torch.int32)
        assert all(torch.equal(a, b) for a, b in zip(back, (crow, col, clean), strict=True))


def test_int8_quantization_per_row() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(9, 50, generator=gen) * torch.logspace(-3, 2, 9)[:, None]
    w[4] = 0  # an all-zero row: scale 1
    q, scale = quantize_rows(w)
    assert q.dtype == I8 and scale.dtype == F32 and scale.shape == (9,) and bool((scale > 0).all())
    assert int(q.abs().max()) == 127 and scale[4] == 1 and not q[4].any()
    assert torch.equal(q.abs().amax(1)[[0, 1, 2, 3, 5]], torch.full((5,), 127, dtype=I8))
    error = (dequantize_rows(q, scale, torch.float64) - w.double()).abs()
    assert bool((error <= scale.double()[:, None] / 2 * (1 + 1e-6)).all())  # round to nearest: half a step
    crow = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    values = torch.tensor([0.5, -1.0, 0.25, 8.0, -2.0, 0.0, 1.0])
    qc, sc = quantize_csr(crow, values)
    assert sc.tolist() == pytest.approx([1 / 127, 1.0, 8 / 127]) and qc.tolist()[:4] == [64, -127, 32, 127]
    assert dequantize_csr(crow, qc, sc).tolist() == pytest.approx(values.tolist(), abs=8 / 127 / 2)


# --- the kernels ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("dtype", [F32, BF16, I8])
@pytest.mark.parametrize("n_tok", [1, 2, 3, 17, 70])  # gather (1, 2) and 16/32/64-token tiles
def test_spmm_variants_match_the_dequantized_reference(dtype: torch.dtype, index: torch.dtype, n_tok: int,
                                                        kernel_variant: str) -> None:
    """Every value dtype × column encoding of `spmm`, rows stored sorted (scales permuted along), on the
    gather and tile paths; int8 against scale[row] · q, bf16 within its output rounding; under the tuner's
    extreme settings and each build variant (`kernel_variant`)."""
    _require_kernels()
    gen = torch.Generator().manual_seed(n_tok)
    n_out, n_in = 70, 1100
    crow, col, values = _csr(n_out, n_in, 0.03, gen)
    crow, col, values, scale, exact = _encode(crow, col, values, dtype, index)
    w = _dense(crow, col, exact, n_in)
    x = torch.randn(n_in, n_tok, generator=gen)
    x = x.bfloat16() if dtype == BF16 else x
    want = w @ x.double()
    s_crow, s_col, s_values, rows = kernels.sort_rows(crow, col, values)
    s_scale = None if scale is None else scale[rows.long()].contiguous()
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = kernels.spmm_cpu(x, s_crow, s_col, s_values, rows=rows, scale=s_scale)
        plain = kernels.spmm_cpu(x, crow, col, values, scale=scale)
    finally:
        torch.set_num_threads(saved)
    assert got.dtype == x.dtype
    tol = 2**-8 if dtype == BF16 else 1e-5  # bf16: the output rounded to bf16
    for y in (got, plain):
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("dtype", [F32, BF16, I8])
def test_spmm_gather_loop_at_up_to_sixteen_tokens_and_row_scales_on_float_values(dtype: torch.dtype,
                                                                               index: torch.dtype) -> None:
    """A tuner may send 16 tokens through the gather loop (gather_below=17); a scale given with float
    values multiplies each row's sum just the same."""
    _require_kernels()
    gen = torch.Generator().manual_seed(3)
    crow, col, values = _csr(33, 700, 0.05, gen)
    crow, col, values, scale, exact = _encode(crow, col, values, dtype, index)
    if scale is None:
        scale = torch.rand(33, generator=gen) + 0.5
        exact = exact * scale.double()[row_of_links(crow)]
    w = _dense(crow, col, exact, 700)
    for n_tok in (1, 5, 16):
        x = torch.randn(700, n_tok, generator=gen)
        x = x.bfloat16() if dtype == BF16 else x
        with override(gather_below=17):
            got = kernels.spmm_cpu(x, crow, col, values, scale=scale)
        want = w @ x.double()
        tol = 2**-8 if dtype == BF16 else 1e-5
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


def test_spmm_rejects_int8_without_its_scales_and_mixed_dtypes() -> None:
    crow, col, values = _csr(8, 20, 0.5, torch.Generator().manual_seed(4))
    q, scale = quantize_csr(crow, values)
    x = torch.randn(20, 2)
    with pytest.raises(TypeError, match="scale"):
        kernels.spmm_cpu(x, crow, col, q)
    with pytest.raises(TypeError, match="scale"):
        kernels.spmm_cpu(x, crow, col, q, scale=scale[:-1])
    with pytest.raises(TypeError, match="int8 values"):
        kernels.spmm_cpu(x.bfloat16(), crow, col, q, scale=scale)


def test_torch_fallback_reads_int8_and_column_deltas(no_compiled_kernels: str) -> None:
    """Without the compiled kernels `spmm_cpu` still computes S X from int8 values and 8-bit deltas."""
    gen = torch.Generator().manual_seed(5)
    crow, col, values = _csr(30, 900, 0.02, gen)
    crow, col, values, scale, exact = _encode(crow, col, values, I8, torch.uint8)
    s_crow, s_col, s_values, rows = kernels.sort_rows(crow, col, values)
    x = torch.randn(900, 7, generator=gen)
    got = kernels.spmm_cpu(x, s_crow, s_col, s_values, rows=rows, scale=scale[rows.long()].contiguous())
    torch.testing.assert_close(got.double(), _dense(crow, col, exact, 900) @ x.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_tok", [1, 2, 3, 4])
@pytest.mark.parametrize("n_in", [512, 77, 16, 5])  # whole vector blocks, single vectors, a scalar tail, tail only
def test_int8_gemv_matches_the_dequantized_reference(n_tok: int, n_in: int, kernel_variant: str) -> None:
    _require_kernels()
    gen = torch.Generator().manual_seed(n_tok * n_in)
    q, scale = quantize_rows(torch.randn(301, n_in, generator=gen))
    x = torch.randn(n_tok, n_in, generator=gen)
    out = torch.full((n_tok, 301), float("nan"))
    assert kernels.dense_gemv(q, x, out, scale=scale)
    want = x.double() @ dequantize_rows(q, scale, torch.float64).t()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    with pytest.raises(ValueError, match="scales"):
        kernels.dense_gemv(q, x, out)


@pytest.mark.parametrize("activation", ["silu", "gelu", "identity"])
@pytest.mark.parametrize("n_tok", [1, 3, 4])
@pytest.mark.parametrize("big", [False, True])  # True: above 2^18 multiply-adds, multi-threaded
def test_int8_lowrank_matches_the_dequantized_reference(activation: str, n_tok: int, big: bool) -> None:
    from chtsl_infer.model.layers import activation_fn

    _require_kernels()
    gen = torch.Generator().manual_seed(n_tok + 10 * big)
    outs, ranks, n_in = ([600, 333, 2100], [130, 71, 9], 1000) if big else ([40, 24, 19], [5, 3, 7], 70)
    a, a_scale = quantize_rows(torch.randn(sum(ranks), n_in, generator=gen))
    bq = [quantize_rows(torch.randn(o, r, generator=gen)) for o, r in zip(outs, ranks, strict=True)]
    b = torch.cat([q.reshape(-1) for q, _ in bq])
    b_scale = torch.cat([s for _, s in bq])
    x = torch.randn(n_tok, n_in, generator=gen).t()  # strided tokens
    y0 = torch.randn(sum(outs), n_tok, generator=gen)
    y = y0.clone()
    shapes = torch.tensor([outs, ranks], dtype=torch.int32)
    assert kernels.lowrank_fm(a, x, b, shapes, 0.5, activation, y, a_scale=a_scale, b_scale=b_scale)
    h = activation_fn(activation, dequantize_rows(a, a_scale, torch.float64) @ x.double())
    want, r0, o0 = y0.double(), 0, 0
    for o, r, (q, s) in zip(outs, ranks, bq, strict=True):
        want[o0:o0 + o] += 0.5 * dequantize_rows(q, s, torch.float64) @ h[r0:r0 + r]
        r0, o0 = r0 + r, o0 + o
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert not kernels.lowrank_fm(a, x.bfloat16(), b, shapes, 0.5, activation, y.bfloat16(), a_scale, b_scale)
    with pytest.raises(ValueError, match="scales"):
        kernels.lowrank_fm(a, x, b, shapes, 0.5, activation, y, a_scale=a_scale)


def test_the_probe_reports_the_int8_gather_path() -> None:
    info = kernels.kernel_info()
    if not info.available:
        pytest.skip("no C compiler")
    assert info.gather16 == ("avx512f" in info.isa)


# --- int8 activations: spmm_a8's layout and kernel ----------------------------------------------------

def quantized_activations(x: torch.Tensor, page: int = 256) -> torch.Tensor:
    """x (in, T) fp32 as spmm_a8 rounds it, in float64: per token and page of `page` features, scale
    max|x| / 127 (fp32), x / scale rounded to nearest even, times the scale."""
    n_in, n_tok = x.shape
    pages = -(-n_in // page)
    xp = torch.zeros(n_tok, pages * page)
    xp[:, :n_in] = x.t()
    xp = xp.view(n_tok, pages, page)
    scale = xp.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(scale > 0, torch.round(xp / scale.clamp_min(torch.finfo(torch.float32).tiny)), 0.0)
    return (q.clamp(-127, 127).double() * scale.double()).view(n_tok, -1)[:, :n_in].t()


@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("n_tok", [1, 3, 7])
@pytest.mark.parametrize(("n_out", "n_in", "density"), [(70, 1100, 0.03), (37, 300, 0.5), (16, 256, 1.0)])
def test_spmm_a8_matches_the_quantized_reference(index: torch.dtype, n_tok: int, n_out: int, n_in: int,
                                                 density: float) -> None:
    """spmm_a8 (int8 weights, int8 activations per 256-feature page) on rows stored sorted: the float64
    product of the dequantized weights and the per-page rounded activations (`quantized_activations`),
    up to fp32 summation over pages; groups of 16 rows cut short, pages cut short, empty rows, full
    pages (64 steps), a zero page of x; built from int16, int32 or 8-bit delta columns; links spilled
    past a page's steps as the packer chooses, none (every row padded) or as many as it may."""
    _require_kernels()
    gen = torch.Generator().manual_seed(n_tok + n_in)
    crow, col, values = _csr(n_out, n_in, density, gen)
    crow, col, values, scale, exact = _encode(crow, col, values, I8, index)
    w = _dense(crow, col, exact, n_in)
    x = torch.randn(n_in, n_tok, generator=gen)
    x[: min(256, n_in) // 2, 0] *= 1e-3  # pages with a wide and a narrow range
    if n_in > 512:
        x[256:512] = 0.0  # a page of zeros: scale 0
    want = w @ quantized_activations(x)
    s_crow, s_col, s_values, rows = kernels.sort_rows(crow, col, values)
    bound = (w.abs() @ quantized_activations(x).abs()) * 1e-6
    for spill_cost in (kernels.sparse.A8_SPILL_COST, 10**6, 0):
        layout = kernels.a8_pack(s_crow, s_col, s_values, scale[rows.long()], rows, n_in, spill_cost)
        assert layout.steps.shape == (-(-n_out // 16), -(-n_in // 256)) and int(layout.steps.max()) <= 64
        links = int((s_values != 0).sum())  # padding links of the deltas hold zero weights
        spilled = int(layout.spill_start[-1])
        assert spilled == 0 if spill_cost == 10**6 else spill_cost or spilled > 0 or links == 0
        got = kernels.spmm_a8(x, layout)
        assert torch.all((got.double() - want).abs() <= bound + 1e-30), spill_cost
    close = kernels.spmm_cpu(x, s_crow, s_col, s_values, rows=rows, scale=scale[rows.long()])  # fp32 activations
    torch.testing.assert_close(got, close, rtol=0.05, atol=0.05 * float(close.abs().max()))


def test_a8_pack_rejects_a_column_past_the_row() -> None:
    _require_kernels()
    crow = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="outside"):
        kernels.a8_pack(crow, torch.tensor([3, 300], dtype=torch.int16), torch.ones(2, dtype=I8), torch.ones(1),
                        torch.zeros(1, dtype=torch.int32), 300 - 1)


@pytest.mark.parametrize("n_tok", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n_in", [64, 300, 512, 1100])
def test_dense_a8_rows_match_the_quantized_reference(n_tok: int, n_in: int) -> None:
    """The dense int8 rows with int8 activations (csrc/spmm_a8.c: the lm_head's `gemv_a8`, the low-rank
    `lowrank_fm_a8` with B in panels and h rounded per member): the float64 products of the dequantized
    weights and the per-page rounded input, up to fp32 summation over pages (and h's fp32 rounding, a
    rank-5 member's ties included); rows and pages cut short (n_in 300, 1100), a zero page; the
    low-rank branch for a prompt's 7 tokens too (4 at a time)."""
    _require_kernels()
    gen = torch.Generator().manual_seed(10 * n_in + n_tok)
    x = torch.randn(n_in, n_tok, generator=gen)
    if n_in > 512:
        x[256:512] = 0.0
    xq = quantized_activations(x)
    q = torch.randint(-127, 128, (37, n_in), dtype=I8, generator=gen)
    scale = torch.rand(37, generator=gen) + 0.5
    want = (scale.double()[:, None] * q.double()) @ xq  # (37, T)
    out = torch.empty(n_tok, 37)
    if n_tok <= kernels.GEMV_MAX_TOKENS:  # the lm_head's GEMV: decoding only
        assert kernels.dense_gemv(q, x.t().contiguous(), out, scale=scale, int8_activations=True)
        bound = (scale.double()[:, None] * q.double().abs()) @ xq.abs() * 1e-6
        assert torch.all((out.t().double() - want).abs() <= bound + 1e-30)
    # the low-rank branch: two members (out 20 and 17, ranks 5 and 3); A's input rounded, h fp32
    a = torch.randint(-127, 128, (8, n_in), dtype=I8, generator=gen)
    a_scale = torch.rand(8, generator=gen) * 1e-3
    b = torch.randint(-127, 128, (20 * 5 + 17 * 3,), dtype=I8, generator=gen)
    b_scale = torch.rand(37, generator=gen) * 1e-2
    shapes = torch.tensor([[20, 17], [5, 3]], dtype=torch.int32)
    y = torch.randn(37, n_tok, generator=gen)
    h = 0.5 * torch.nn.functional.silu((a_scale.double()[:, None] * a.double()) @ xq)  # (8, T)
    h = h.float()  # the kernel's h, rounded per member (5, then 3 values) to int8 for B
    b0 = (b_scale[:20].double()[:, None] * b[:100].double().view(20, 5)) @ quantized_activations(h[:5], 5)
    b1 = (b_scale[20:].double()[:, None] * b[100:].double().view(17, 3)) @ quantized_activations(h[5:], 3)
    want = y.double() + torch.cat([b0, b1])
    panels = kernels.a8_panels(b, [20, 17], [5, 3])  # B as the kernel reads it: 16-row blocks, 4 ranks a step
    assert panels.numel() == 32 * 8 + 32 * 4
    assert torch.equal(kernels.a8_panel_block(panels, [20, 17], [5, 3], 1), b[100:].view(17, 3))
    assert kernels.lowrank_fm(a, x, panels, shapes, 0.5, "silu", y, a_scale, b_scale, int8_activations=True)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_in", [40, 300])
def test_a8_round_is_the_kernels_rounding(n_in: int) -> None:
    """`kernels.a8_round` (the float paths of an int8-activation model: a forward's low-rank A and
    lm_head) rounds exactly as the C kernels do: through the identity, `gemv_a8` returns its input's
    rounded values bit for bit (ties, a zero page and a tiny page included)."""
    _require_kernels()
    gen = torch.Generator().manual_seed(n_in)
    x = torch.randn(n_in, 3, generator=gen)
    x[:, 1] = torch.arange(n_in) % 7 - 3.0  # |x| ≤ 3: q = 127 x / 3, many halves
    x[:, 2] = 0.0
    x[: min(n_in, 256), 2] = 1e-30 * torch.randn(min(n_in, 256), generator=gen)
    got = torch.empty(3, n_in)
    assert kernels.dense_gemv(torch.eye(n_in, dtype=I8), x.t().contiguous(), got, scale=torch.ones(n_in),
                              int8_activations=True)
    assert torch.equal(got.t(), kernels.a8_round(x))
    assert torch.equal(kernels.a8_round(x), quantized_activations(x).float())  # q · s in fp32, rounded once


# --- the int8 runtime: the kernels composed, every method ------------------------------------------------

ATOL = 1e-4  # the runtime tests' fp32 tolerance on logits


@pytest.mark.parametrize("widen", [0, 1])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_int8_runtime_matches_the_dequantized_model(method: str, widen: int) -> None:
    """An int8 export run by the sparse backend (int8 kernels, int8 lm_head, bf16 embedding), its column
    deltas held as read or widened (`widen_deltas`), gives the logits of its dequantized weights in
    float64, for a full forward, a prefill and ≤ 4-token decoding steps (the one-call C path); it holds
    int8 buffers and generates what the dense reference does."""
    from chtsl_infer.formats.packed import pack_model, unpack_model
    from chtsl_infer.kernels.settings import override
    from chtsl_infer.runtime.backends import FusedLinears, from_packed
    from chtsl_infer.runtime.int8 import Int8Linear

    _require_kernels()
    model = tiny_model_nonzero_b(method, num_key_value_heads=2)
    ids = random_ids(2, 14, seed=3)
    reference = unpack_model(pack_model(model, I8), torch.float64)
    with torch.no_grad():
        want = reference(input_ids=ids, use_cache=False).logits
    with override(widen_deltas=widen):
        rt = from_packed(pack_model(model, I8), "sparse")
    assert {g.col.dtype for g in rt.model.modules() if isinstance(g, FusedLinears) and g.sparse} <= {
        torch.int16 if widen else torch.uint8}
    assert rt.dtype == F32 and isinstance(rt.model.lm_head, Int8Linear)
    assert rt.model.model.embed_tokens.weight.dtype == BF16
    groups = [m for m in rt.model.modules() if isinstance(m, FusedLinears)]
    assert all(g.int8 and g.decoder() is not None for g in groups)
    assert all(t.dtype == I8 for g in groups for t in (g.values if g.sparse else None, g.lora_A, g.lora_B, g.weight)
               if t is not None)
    torch.testing.assert_close(rt.logits(ids).double(), want, atol=ATOL, rtol=0)
    cache = rt.new_cache(2, 14)
    torch.testing.assert_close(rt.decode_step(ids[:, :8], cache).double(), want[:, 7], atol=ATOL, rtol=0)
    for a, b in ((8, 9), (9, 11), (11, 14)):  # 1, 2 and 3 tokens per sequence
        torch.testing.assert_close(rt.decode_step(ids[:, a:b], cache).double(), want[:, b - 1], atol=ATOL, rtol=0)
    fp32 = from_packed(pack_model(model), "sparse")
    assert rt.model_bytes < 0.5 * fp32.model_bytes
    dense = from_packed(pack_model(model, I8), "dense")  # the dequantized reference backend
    assert torch.equal(rt.generate(ids[:, :5], max_new_tokens=6), dense.generate(ids[:, :5], max_new_tokens=6))


@pytest.mark.parametrize("widen", [0, 1])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_float_exports_with_column_deltas_on_the_sparse_backend(method: str, widen: int) -> None:
    """fp32 and bf16 exports with 8-bit column deltas (bf16's default) through the sparse backend, held as
    read (widen_deltas 0: the kernels read the deltas) or widened to int16 columns (1): fp32 gives the
    float64 logits of its weights within the fp32 tolerance (full forward, prefill, 1–3-token decoding
    steps: the one-call C path); bf16 (bf16 activations, the bf16 kernels) stays within bf16's 1e-2 of
    them and within 1e-3 of the same weights exported with absolute int16 columns."""
    from chtsl_infer.formats.packed import pack_model, unpack_model
    from chtsl_infer.kernels.settings import override
    from chtsl_infer.runtime.backends import FusedLinears, from_packed

    _require_kernels()
    model = tiny_model_nonzero_b(method, num_key_value_heads=2)
    ids = random_ids(2, 14, seed=4)
    for dtype in (F32, BF16):
        packed = pack_model(model, dtype, "delta8")
        with torch.no_grad():
            want = unpack_model(packed, torch.float64)(input_ids=ids, use_cache=False).logits
        with override(widen_deltas=widen):
            rt = from_packed(packed, "sparse", dtype=dtype)
        groups = [m for m in rt.model.modules() if isinstance(m, FusedLinears)]
        assert all(g.decoder() is not None for g in groups)
        held = torch.int16 if widen else torch.uint8
        assert all(g.col.dtype == held and g.values.dtype == dtype for g in groups if g.sparse)
        cache = rt.new_cache(2, 14)
        got = [rt.logits(ids), rt.decode_step(ids[:, :8], cache)]
        got += [rt.decode_step(ids[:, a:b], cache) for a, b in ((8, 9), (9, 11), (11, 14))]  # 1, 2, 3 tokens
        wanted = [want, want[:, 7], want[:, 8], want[:, 10], want[:, 13]]
        for g, w in zip(got, wanted, strict=True):
            if dtype == F32:
                torch.testing.assert_close(g.double(), w, atol=ATOL, rtol=0)
            else:
                assert torch.linalg.vector_norm(g.double() - w) <= 1e-2 * torch.linalg.vector_norm(w)
        if dtype == BF16:
            absolute = from_packed(pack_model(model, dtype, "absolute"), "sparse", dtype=dtype).logits(ids).double()
            assert torch.linalg.vector_norm(got[0].double() - absolute) <= 1e-3 * torch.linalg.vector_norm(absolute)


@pytest.mark.parametrize("item_bytes", [64 << 10, 64])
def test_all_blocks_in_one_c_call_int8_equal_the_block_loop(item_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """decode_layers with int8 groups (fp32 activations) equals feature_major's loop over the same int8
    kernels bit for bit: logits and KV cache, 1–3 tokens per sequence, GQA, small work items."""
    from chtsl_infer.formats.packed import pack_model
    from chtsl_infer.runtime import feature_major
    from chtsl_infer.runtime.backends import from_packed

    _require_kernels()
    model = tiny_model_nonzero_b("chtsl", num_key_value_heads=2)
    ids = random_ids(2, 14, seed=6)
    rt = from_packed(pack_model(model, I8), "sparse")
    assert feature_major._decode_layers(rt.model, F32) is not None
    assert_one_call_equals_the_block_loop(rt, ids, monkeypatch, item_bytes)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_int8_activations_runtime(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`int8_activations`: every sparse group of an int8 model moves to spmm_a8's layout (no CSR left);
    the full forward, the prefill and 1–3-token decoding steps (one C call for every block) give the
    same logits within fp32's 1e-4, the one-call path equals the block loop bit for bit, the logits stay
    within 3 % of the fp32-activation int8 model's (random tiny weights: sltrain's large low-rank branch
    on rounded inputs 1.6 %; trained models: tests/test_eval.py), and it generates. A float model
    refuses it."""
    from chtsl_infer.errors import ChtslError
    from chtsl_infer.formats.packed import pack_model
    from chtsl_infer.runtime import feature_major
    from chtsl_infer.runtime.backends import FusedLinears, from_packed

    _require_kernels()
    model = tiny_model_nonzero_b(method, num_key_value_heads=2)
    ids = random_ids(2, 14, seed=7)
    if not pack_model(model).linears["model.layers.0.mlp.down_proj"].has_sparse:
        with pytest.raises(ChtslError, match="this model has none"):
            from_packed(pack_model(model, I8), "sparse", dtype=I8, int8_activations=True)
        return
    plain = from_packed(pack_model(model, I8), "sparse", dtype=I8)
    rt = from_packed(pack_model(model, I8), "sparse", dtype=I8, int8_activations=True)
    assert rt.int8_activations
    groups = [g for g in rt.model.modules() if isinstance(g, FusedLinears)]
    sparse = [g for g in groups if g.sparse]
    assert all(g.a8_layout() is not None and g.crow is None and g.values is None for g in sparse)
    want = rt.logits(ids)
    ref = plain.logits(ids)
    assert 0 < torch.linalg.vector_norm(want - ref) <= 3e-2 * torch.linalg.vector_norm(ref)
    assert rt.model.lm_head.int8_activations  # the int8 lm_head rounds its input too
    if sparse:
        assert feature_major._decode_layers(rt.model, F32) is not None
    cache = rt.new_cache(2, 14)
    torch.testing.assert_close(rt.decode_step(ids[:, :8], cache), want[:, 7], atol=ATOL, rtol=0)
    for a, b in ((8, 9), (9, 11), (11, 14)):
        torch.testing.assert_close(rt.decode_step(ids[:, a:b], cache), want[:, b - 1], atol=ATOL, rtol=0)
    assert_one_call_equals_the_block_loop(rt, ids, monkeypatch, 64)
    assert rt.generate(ids[:, :5], max_new_tokens=4).shape == (2, 9)
    with monkeypatch.context() as m:  # the float path of the low-rank branch (an activation C lacks) agrees
        m.setattr(kernels, "lowrank_fm", lambda *args, **kwargs: False)
        torch.testing.assert_close(rt.logits(ids), want, atol=ATOL, rtol=0)
    with pytest.raises(ChtslError, match="int8 activations need int8 weights"):
        from_packed(pack_model(model), "sparse", int8_activations=True)


def test_int8_groups_refuse_bf16_activations() -> None:
    """int8 weights run with fp32 activations: the one-call path refuses to be built for bf16."""
    from chtsl_infer.formats.packed import pack_model
    from chtsl_infer.runtime.backends import FusedLinears, from_packed

    _require_kernels()
    rt = from_packed(pack_model(tiny_model_nonzero_b("chtsl"), I8), "sparse")
    decoders = [g.decoder() for g in rt.model.modules() if isinstance(g, FusedLinears)]
    norm = rt.model.model.layers[0].input_layernorm.weight
    with pytest.raises(ValueError, match="float32 activations"):
        kernels.DecodeLayers([(norm.bfloat16(), norm.bfloat16(), decoders[:4])], 1e-6, 8, BF16)


# --- other instruction sets: the AVX2 and portable paths on this machine --------------------------------

OTHER_ISA = """
import sys
import torch
from chtsl_infer.kernels import build
build.FLAG_SETS = ({flags!r},)
from chtsl_infer import kernels
info = kernels.kernel_info()
assert info.available and info.flags == {flags!r}, info
assert ("avx512f" in info.isa) is False and info.gather16 is False and info.tile_vw == 8, info
sys.argv = ["pytest"]
import pytest
TESTS = ("spmm_variants or sixteen_tokens or int8_gemv or int8_lowrank or int8_runtime or one_c_call_int8 "
         "or spmm_a8 or int8_activations or dense_a8 or a8_round")
sys.exit(pytest.main(["-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider", {path!r}, "-k", TESTS]))
"""


@pytest.mark.slow  # builds the library twice more (~1 min each) and reruns the kernel tests
@pytest.mark.parametrize("flags", [("-O2", "-march=x86-64-v3", "-fopenmp"), ("-O1", "-fopenmp")],
                         ids=["avx2", "portable"])
def test_kernels_built_for_avx2_and_without_vector_extensions(flags: tuple[str, ...], tmp_path: Path) -> None:
    """The AVX2 intrinsics (vpmovsxbd/vcvtdq2ps widening, 8-float vectors) and the portable vector code,
    built on this machine without AVX-512, pass the same kernel tests."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None or not Path("/proc/cpuinfo").exists() or " avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("needs a C compiler on an x86-64 CPU with AVX2")
    env = {**os.environ, "CHTSL_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    script = OTHER_ISA.format(flags=flags, path=str(Path(__file__)))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1200,
                         cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
