"""The CSR×dense kernels against a dense-masked matmul (random shapes, densities, empty rows)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chtsl_infer import kernels
from chtsl_infer.kernels import build


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


def csr_matmul_cpu(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`X Sᵀ` token-major: x (T, in) fp32 -> (T, out) fp32 (two transposes around `spmm_cpu`)."""
    return kernels.spmm_cpu(x.t().contiguous(), crow, col, values).t().contiguous()


def spmm_reference(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                   n_in: int) -> torch.Tensor:
    """`S X` through a densified S: x (in, T) -> (out, T)."""
    n_out = crow.numel() - 1
    counts = (crow[1:] - crow[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(n_out), counts)
    w = torch.zeros(n_out, n_in, dtype=values.dtype)
    w[rows, col.long()] = values
    return w @ x


def test_compiled_kernel_is_in_use() -> None:
    """CI machines have a C compiler: the fast path, not the torch fallback, is what the tests check."""
    ok, how = kernels.cpu_kernel_status()
    assert ok, how


@pytest.mark.parametrize(
    ("tokens", "out_f", "in_f", "density", "empty_rows"),
    [
        (1, 96, 64, 0.05, 10),  # decoding: one token, gather path, row-chunk parallelism
        (2, 50, 33, 0.2, 3),  # the largest gather case
        (3, 48, 40, 0.2, 3),  # the smallest tiled case: 3 of 16 tokens
        (7, 33, 50, 0.3, 5),  # fewer tokens than a vector, odd shapes
        (16, 20, 24, 0.2, 2),  # exactly one 16-token tile
        (29, 60, 24, 0.2, 2),  # one partial 32-token tile
        (64, 128, 80, 0.1, 0),  # exactly one 64-token tile
        (67, 70, 120, 0.02, 20),  # a full tile and a 3-token tail; very sparse
        (300, 200, 130, 0.5, 0),  # several tiles, half dense
        (5, 40, 30, 0.0, 0),  # no links at all: Y = 0
        (20, 16, 16, 1.0, 3),  # fully dense rows next to empty ones
        (150, 40, 4200, 0.01, 4),  # wide input: 32-token tiles (4 full, a 22-token tail)
        (1, 1, 1, 1.0, 0),  # 1×1: more row chunks than rows
        (3, 5, 9, 0.5, 0),  # row chunks of 2 over 5 rows: the last chunk starts past the end
    ],
)
def test_kernel_matches_dense_masked_matmul(tokens: int, out_f: int, in_f: int, density: float,
                                            empty_rows: int, kernel_variant: str) -> None:
    gen = torch.Generator().manual_seed(tokens * 1000 + out_f)
    crow, col, val, w = _random_csr(out_f, in_f, density, gen, empty_rows)
    x = torch.randn(in_f, tokens, generator=gen)  # feature-major
    saved = torch.get_num_threads()
    torch.set_num_threads(2)  # row chunking (few tokens) depends on the thread count
    try:
        y = kernels.spmm_cpu(x, crow, col, val)
        y_tm = csr_matmul_cpu(x.t().contiguous(), crow, col, val)
    finally:
        torch.set_num_threads(saved)
    assert y.shape == (out_f, tokens) and y_tm.shape == (tokens, out_f)
    torch.testing.assert_close(y, w @ x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_tm, x.t() @ w.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(spmm_reference(x, crow, col, val, in_f), w @ x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_thread_counts_agree(threads: int) -> None:
    gen = torch.Generator().manual_seed(1)
    crow, col, val, w = _random_csr(257, 190, 0.05, gen, empty_rows=7)
    x = torch.randn(190, 150, generator=gen)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.testing.assert_close(kernels.spmm_cpu(x, crow, col, val), w @ x, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_link_balanced_chunks_cover_skewed_rows(tokens: int, kernel_variant: str) -> None:
    """Row chunks split by link count: a few full rows among empty ones (and no links at all) still
    write every output row once."""
    gen = torch.Generator().manual_seed(tokens)
    w = torch.zeros(64, 48)
    w[[3, 40, 41], :] = torch.randn(3, 48, generator=gen)  # three full rows hold every link
    crow = torch.zeros(65, dtype=torch.int32)
    crow[1:] = (w != 0).sum(1).cumsum(0).to(torch.int32)
    col = (w != 0).nonzero()[:, 1].to(torch.int16)
    x = torch.randn(48, tokens, generator=gen)
    for crow_, col_, val in ((crow, col, w[w != 0]), (torch.zeros(65, dtype=torch.int32), col[:0], w[:0, 0])):
        out = torch.full((64, tokens), float("nan"))
        want = w @ x if col_.numel() else torch.zeros(64, tokens)
        torch.testing.assert_close(kernels.spmm_cpu(x, crow_, col_, val.contiguous(), out=out), want, atol=1e-5,
                                   rtol=1e-5)


def test_kernel_int32_columns_strided_rows_and_out_buffer() -> None:
    gen = torch.Generator().manual_seed(2)
    crow, col, val, w = _random_csr(50, 70, 0.2, gen, col_dtype=torch.int32)
    x = torch.randn(70, 100, generator=gen)[:, 10:90]  # rows contiguous, row stride 100 ≠ T
    out = torch.full((50, 120), float("nan"))[:, :80]  # written through its row stride
    y = kernels.spmm_cpu(x, crow, col, val, out=out)
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, w @ x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [3, 70])  # gather path and tiled path
def test_sorted_rows_write_each_row_to_its_place(tokens: int, kernel_variant: str) -> None:
    gen = torch.Generator().manual_seed(7)
    crow, col, val, w = _random_csr(90, 60, 0.15, gen, empty_rows=6)
    s_crow, s_col, s_val, rows = kernels.sort_rows(crow, col, val)
    counts = s_crow[1:] - s_crow[:-1]
    assert bool((counts[1:] >= counts[:-1]).all())  # stored by increasing link count
    assert sorted(rows.tolist()) == list(range(90))
    torch.testing.assert_close(spmm_reference(torch.eye(60), s_crow, s_col, s_val, 60), w[rows.long()])
    x = torch.randn(60, tokens, generator=gen)
    torch.testing.assert_close(kernels.spmm_cpu(x, s_crow, s_col, s_val, rows=rows), w @ x, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="permutation"):
        kernels.spmm_cpu(x, s_crow, s_col, s_val, rows=rows.long())


def test_kernel_non_contiguous_input_and_zero_tokens() -> None:
    gen = torch.Generator().manual_seed(3)
    crow, col, val, w = _random_csr(24, 40, 0.3, gen)
    x = torch.randn(33, 40, generator=gen).t()  # (40, 33) with column-contiguous storage: copied
    torch.testing.assert_close(kernels.spmm_cpu(x, crow, col, val), w @ x, atol=1e-5, rtol=1e-5)
    assert kernels.spmm_cpu(torch.zeros(40, 0), crow, col, val).shape == (24, 0)


def test_kernel_rejects_wrong_dtypes() -> None:
    gen = torch.Generator().manual_seed(4)
    crow, col, val, _ = _random_csr(8, 8, 0.5, gen)
    with pytest.raises(TypeError, match="float32"):
        kernels.spmm_cpu(torch.randn(8, 2, dtype=torch.float64), crow, col, val)
    with pytest.raises(TypeError, match="int32 row pointers"):
        kernels.spmm_cpu(torch.randn(8, 2), crow.long(), col, val)
    for bad in (torch.empty(8, 3), torch.empty(2, 8).t(), torch.empty(8, 2, dtype=torch.float64)):
        with pytest.raises(ValueError, match="out must be"):
            kernels.spmm_cpu(torch.randn(8, 2), crow, col, val, out=bad)
    x = torch.randn(8, 1).expand(8, 5)  # a broadcast view (stride 0 along tokens): copied, not misread
    torch.testing.assert_close(kernels.spmm_cpu(x, crow, col, val), spmm_reference(x, crow, col, val, 8))


def test_torch_fallback_without_a_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No working compiler: the status says why, and spmm_cpu still computes S X (torch CSR)."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("CHTSL_CACHE_DIR", str(tmp_path / "cache"))
    lib, why, note = build._compile()
    assert lib is None and "no-such-cc" in why and "not found" in why and note == ""
    monkeypatch.setattr(build, "library", lambda: (None, why))
    assert kernels.cpu_kernel_status() == (False, why)
    assert not kernels.kernel_info().available and kernels.kernel("spmm", torch.float32, torch.int16) is None
    gen = torch.Generator().manual_seed(6)
    crow, col, val, w = _random_csr(30, 20, 0.2, gen, empty_rows=3)
    x = torch.randn(20, 19, generator=gen)
    torch.testing.assert_close(kernels.spmm_cpu(x, crow, col, val), w @ x, atol=1e-5, rtol=1e-5)
    s_crow, s_col, s_val, rows = kernels.sort_rows(crow, col, val)
    torch.testing.assert_close(kernels.spmm_cpu(x, s_crow, s_col, s_val, rows=rows), w @ x, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # compiles the C kernels into a fresh cache
def test_kernel_builds_into_the_cache_dir_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHTSL_CACHE_DIR", str(tmp_path))
    lib, how, note = build._compile()
    assert lib is not None and note == "", how
    built = sorted((tmp_path / "kernels").glob("spmm-*.so"))
    assert len(built) == 1 and str(built[0]) in how and build.verify(built[0]) is None
    mtime = built[0].stat().st_mtime_ns
    assert build._compile()[0] is not None and built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
    record = build.record_path(built[0])
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == [record.name, built[0].name]  # no temp files


def test_cache_key_covers_the_shared_header(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An edit to the header the kernels include names a new library: a stale build is never loaded."""
    included = {line.split('"')[1] for source in build.SOURCES for line in source.read_text().splitlines()
                if line.startswith('#include "')}
    assert included == {h.name for h in build.HEADERS} >= {"csr_tiles.h", "activation.h", "bf16.h", "kernels.h"}
    key = build._cache_key("cc", build.FLAG_SETS[0])
    edited = []
    for header in build.HEADERS:
        copy = tmp_path / header.name
        copy.write_bytes(header.read_bytes() + b"/* edited */\n")
        edited.append(copy)
    monkeypatch.setattr(build, "HEADERS", tuple(edited))
    assert build._cache_key("cc", build.FLAG_SETS[0]) != key


@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32, torch.int64])
def test_torch_csr_indices_and_matmul_on_cpu_tensors(col_dtype: torch.dtype) -> None:
    """The CUDA path's tensor code (`torch_csr` + `spmm_cuda`) on CPU tensors, where torch's CSR
    matmul runs in fp32: int32 indices whatever the packed dtype, values in the compute dtype."""
    gen = torch.Generator().manual_seed(4)
    crow, col, val, w = _random_csr(70, 50, 0.1, gen, empty_rows=6, col_dtype=col_dtype)
    csr = kernels.torch_csr(crow.long(), col, val.double(), (70, 50), "cpu", torch.float32)
    assert csr.layout == torch.sparse_csr and csr.shape == (70, 50)
    assert csr.crow_indices().dtype == csr.col_indices().dtype == torch.int32
    assert csr.values().dtype == torch.float32 and csr.values().numel() == val.numel()
    x = torch.randn(50, 19, generator=gen)
    torch.testing.assert_close(kernels.spmm_cuda(x, csr), w @ x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(csr.to_dense(), w, atol=0, rtol=0)
    for dtype in (torch.bfloat16, torch.float16):  # half-precision storage (the matmul itself is CUDA-only)
        half = kernels.torch_csr(crow, col, val, (70, 50), "cpu", dtype)
        assert half.values().dtype == dtype and half.crow_indices().dtype == torch.int32
        torch.testing.assert_close(half.to_dense().float(), w, atol=0, rtol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_csr_matches_dense(dtype: torch.dtype) -> None:  # pragma: no cover - GPU machines only
    gen = torch.Generator().manual_seed(5)
    crow, col, val, w = _random_csr(300, 200, 0.05, gen, empty_rows=9)
    csr = kernels.torch_csr(crow, col, val, (300, 200), "cuda", dtype)
    x = torch.randn(200, 77, generator=gen)
    y = kernels.spmm_cuda(x.to("cuda", dtype), csr)
    assert y.dtype == dtype and y.is_cuda
    ref = w @ x
    if dtype == torch.float32:
        torch.testing.assert_close(y.cpu(), ref, atol=1e-4, rtol=1e-4)
    else:  # inputs rounded to 8 (bf16) / 11 (fp16) mantissa bits: a relative bound on the whole output
        rel = torch.linalg.vector_norm(y.float().cpu() - ref) / torch.linalg.vector_norm(ref)
        assert rel <= 1e-2, rel


@pytest.mark.parametrize("n_tok", [1, 2, 5, 40, 130])
@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32])
def test_spmm_cpu_bfloat16_accumulates_in_fp32(n_tok: int, col_dtype: torch.dtype, kernel_variant: str) -> None:
    """bf16 values and activations, fp32 sums: equal to the fp32 product of the same bf16 numbers up to
    the final rounding to bf16 (one bf16 ulp, 2**-8 relative), on the gather (1–2 tokens) and tile paths."""
    from chtsl_infer.kernels import sort_rows, spmm_cpu

    gen = torch.Generator().manual_seed(n_tok)
    n_out, n_in = 96, 300
    mask = torch.rand(n_out, n_in, generator=gen) < 0.2
    mask[5] = False  # an empty row
    crow = torch.zeros(n_out + 1, dtype=torch.int32)
    crow[1:] = mask.sum(1).cumsum(0)
    col = mask.nonzero()[:, 1].to(col_dtype)
    values = torch.randn(int(mask.sum()), generator=gen).to(torch.bfloat16)
    x = torch.randn(n_in, n_tok, generator=gen).to(torch.bfloat16)
    want = spmm_reference(x.float(), crow, col, values.float(), n_in)
    crow_s, col_s, values_s, rows = sort_rows(crow, col, values)
    got = spmm_cpu(x, crow_s, col_s, values_s, rows=rows)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=1e-6, rtol=2**-8)
    assert torch.equal(got, want.to(torch.bfloat16)) or (got.float() - want).abs().max() <= 2**-8 * want.abs().max()
    out = torch.empty(n_out, n_tok, dtype=torch.bfloat16)
    assert spmm_cpu(x, crow_s, col_s, values_s, out=out, rows=rows).data_ptr() == out.data_ptr()
    with pytest.raises(TypeError, match="bfloat16"):
        spmm_cpu(x, crow_s, col_s, values_s.float(), rows=rows)


def test_bf16_kernel_path_is_selected_at_compile_time() -> None:
    """The AVX512-BF16 loop (vdpbf16ps) is compiled where the compiler targets it, else the portable one:
    what the built library reports matches the host's cpuinfo flag, and the AVX512-BF16 source compiles;
    the int8-activation loops likewise with AVX-512 VBMI + VNNI (`a8_vector`)."""
    import shutil
    import subprocess
    from pathlib import Path

    info = kernels.kernel_info()
    if not info.available:
        pytest.skip("no C compiler")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    has = " avx512_bf16" in flags
    assert info.bf16_dot == has and ("avx512bf16" in info.isa) == has
    a8 = all(f" {name}" in flags for name in ("avx512vbmi", "avx512_vnni", "avx512bw"))
    assert info.a8_vector == a8 and a8 == ({"avx512vbmi", "avx512vnni", "avx512bw"} <= set(info.isa))
    cc = shutil.which("cc") or shutil.which("gcc")
    source = next(s for s in build.SOURCES if s.name == "spmm_bf16.c")
    run = subprocess.run([cc, "-O2", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-S", "-o", "-", str(source)],
                         capture_output=True, text=True, timeout=120)
    if run.returncode != 0 and "avx512bf16" in run.stderr:
        pytest.skip("the compiler does not know -mavx512bf16")
    assert run.returncode == 0, run.stderr
    assert "vdpbf16ps" in run.stdout


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_tok", [1, 2, 3, 4])
@pytest.mark.parametrize("n_in", [512, 77, 16])  # whole 64-blocks, 16-blocks and a scalar tail, 16 only
def test_dense_gemv_matches_matmul(w_dtype: torch.dtype, n_tok: int, n_in: int) -> None:
    """The decoding GEMV (lm_head) equals x Wᵀ computed in fp32 from the same (bf16-exact) values."""
    g = torch.Generator().manual_seed(n_tok * n_in)
    w = torch.randn(301, n_in, generator=g).to(w_dtype)
    x = torch.randn(n_tok, n_in, generator=g)
    out = torch.full((n_tok, 301), float("nan"))
    assert kernels.dense_gemv(w, x, out)
    ref = x.double() @ w.double().t()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out_bf16 = torch.empty(n_tok, 301, dtype=torch.bfloat16)  # bf16 logits: the fp32 sums rounded once
    assert kernels.dense_gemv(w, x.bfloat16(), out_bf16)
    torch.testing.assert_close(out_bf16, (x.bfloat16().double() @ w.double().t()).bfloat16(), rtol=8e-3, atol=1e-2)


def test_dense_gemv_declines_what_it_does_not_serve() -> None:
    """False and nothing written: the caller then uses torch's matmul."""
    w = torch.randn(8, 32)
    cases = [(w, torch.randn(5, 32), torch.full((5, 8), float("nan"))),  # more than GEMV_MAX_TOKENS
             (w.half(), torch.randn(1, 32), torch.full((1, 8), float("nan"))),  # fp16 weights
             (w.t(), torch.randn(1, 8), torch.full((1, 32), float("nan"))),  # non-contiguous weight
             (w, torch.randn(1, 32), torch.full((1, 7), float("nan")))]  # wrong out shape
    for weight, x, out in cases:
        assert not kernels.dense_gemv(weight, x, out)
        assert out.isnan().all()


@pytest.mark.parametrize("activation", ["silu", "relu", "gelu", "identity"])
@pytest.mark.parametrize("n_tok", [1, 2, 4])
@pytest.mark.parametrize("big", [False, True])  # True: above the kernel's 2^18 multiply-adds, multi-threaded
def test_lowrank_decode_kernel_matches_torch(activation: str, n_tok: int, big: bool) -> None:
    """y += scale · B_m act(A_m x) per member (the decode path of a fused group) equals torch's products;
    the bf16 variant equals the same products of its bf16 inputs up to the output's bf16 rounding."""
    from chtsl_infer.model.layers import activation_fn

    g = torch.Generator().manual_seed(n_tok)
    outs, ranks, n_in = [40, 24, 19], [5, 3, 7], 70  # output tails, odd ranks, a scalar input tail
    if big:
        outs, ranks, n_in = [600, 333, 2100], [130, 71, 9], 1000  # odd rows per thread, long and short rank rows
    a = torch.randn(sum(ranks), n_in, generator=g)
    bs = [torch.randn(o, r, generator=g) for o, r in zip(outs, ranks, strict=True)]
    x = torch.randn(n_tok, n_in, generator=g).t()  # feature-major view with strided tokens
    y0 = torch.randn(sum(outs), n_tok, generator=g)
    y = y0.clone()
    shapes = torch.tensor([outs, ranks], dtype=torch.int32)
    assert kernels.lowrank_fm(a, x, torch.cat([b.reshape(-1) for b in bs]), shapes, 0.5, activation, y)
    h, ref, r0, o0 = activation_fn(activation, a.double() @ x.double()), y0.double(), 0, 0  # float64 reference
    for o, r, b in zip(outs, ranks, bs, strict=True):
        ref[o0:o0 + o] += 0.5 * b.double() @ h[r0:r0 + r]
        r0, o0 = r0 + r, o0 + o
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))  # fp32 sums
    a16, x16, y16 = a.bfloat16(), x.bfloat16(), y0.bfloat16()
    b16 = torch.cat([b.reshape(-1) for b in bs]).bfloat16()
    assert kernels.lowrank_fm(a16, x16, b16, shapes, 0.5, activation, y16)
    h, ref, r0, b0, o0 = activation_fn(activation, a16.double() @ x16.double()), y0.bfloat16().double(), 0, 0, 0
    for o, r in zip(outs, ranks, strict=True):
        ref[o0:o0 + o] += 0.5 * b16[b0:b0 + o * r].view(o, r).double() @ h[r0:r0 + r]
        r0, b0, o0 = r0 + r, b0 + o * r, o0 + o
    torch.testing.assert_close(y16.double(), ref, rtol=1e-2, atol=1e-3 * float(ref.abs().max()))  # y rounded to bf16
    assert not kernels.lowrank_fm(a, torch.randn(n_in, 5), a.new_empty(0), shapes, 0.5, activation,
                                  torch.empty(sum(outs), 5))  # prefill widths go to torch


def _skip_without_kernels() -> None:
    if not kernels.decode_kernels_serve(torch.zeros(1)):
        pytest.skip(f"no compiled kernels: {kernels.cpu_kernel_status()[1]}")


TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}  # bf16: a rounding or two apart from torch's bf16 ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_tok", [1, 2, 4])
def test_rms_norm_decode_kernel_matches_torch(n_tok: int, dtype: torch.dtype) -> None:
    from chtsl_infer.runtime.feature_major import rms_norm

    _skip_without_kernels()
    g, tol = torch.Generator().manual_seed(n_tok), TOL[dtype]
    h, weight = (torch.randn(67, n_tok, generator=g) * 3).to(dtype), torch.randn(67, generator=g).to(dtype)
    torch.testing.assert_close(kernels.rms_norm_fm(h, weight, 1e-6, torch.empty(67, n_tok, dtype=dtype)),
                               rms_norm(h, weight, 1e-6), rtol=tol, atol=tol)
    last = torch.randn(67, 2, 3, generator=g).to(dtype).view(67, 6)[:, 2::3]  # sequences' last tokens: strided
    torch.testing.assert_close(kernels.rms_norm_fm(last, weight, 1e-5, torch.empty(67, 2, dtype=dtype)),
                               rms_norm(last, weight, 1e-5), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_decode_kernel_matches_torch(dtype: torch.dtype) -> None:
    _skip_without_kernels()
    g = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(2 * 45, 3, generator=g) * 4).to(dtype)
    want = torch.nn.functional.silu(gate_up[:45]) * gate_up[45:]
    got = kernels.silu_mul_fm(gate_up)
    assert got.data_ptr() == gate_up.data_ptr()  # in place, the gate rows
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize(("batch", "seq", "start"), [(1, 1, 0), (2, 1, 5), (1, 3, 4), (2, 2, 0), (1, 4, 9)])
@pytest.mark.parametrize("n_kv", [4, 2])  # 2: grouped-query attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("min_work", [1, 1 << 30])  # (sequence, head) pairs split over 2 threads, or one thread
def test_attention_decode_kernel_matches_torch_attention(batch: int, seq: int, start: int, n_kv: int,
                                                         dtype: torch.dtype, min_work: int) -> None:
    """RoPE, cache write and causal attention over the cache equal the torch path (SDPA) of feature_major."""
    from chtsl_infer.kernels.settings import override
    from chtsl_infer.runtime.feature_major import KVCache, _attention

    _skip_without_kernels()
    g = torch.Generator().manual_seed(batch * 10 + seq + start)
    n_heads, head_dim, capacity, end = 4, 16, 13, start + seq

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    qkv = randn((n_heads + 2 * n_kv) * head_dim, batch * seq)
    cos, sin = randn(head_dim, 1, capacity), randn(head_dim, 1, capacity)
    key, value = randn(batch, n_kv, capacity, head_dim), randn(batch, n_kv, capacity, head_dim)
    ref = KVCache([key.clone()], [value.clone()], cos, sin, length=start)
    mask = torch.ones(seq, end, dtype=torch.bool).tril_(start) if start > 0 and seq > 1 else None
    want = _attention(qkv, cos[:, :, start:end], sin[:, :, start:end], ref, 0, start, end, mask, batch, seq,
                      (n_heads, n_kv, head_dim), 0.3)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with override(attn_min_work=min_work):
            got = kernels.attention_decode(qkv, key, value, cos, sin, start, seq, n_heads, 0.3,
                                           torch.full((n_heads * head_dim, batch * seq), float("nan"), dtype=dtype))
    finally:
        torch.set_num_threads(saved)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: torch rounds q and k after each RoPE operation
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(key, ref.key[0], rtol=tol, atol=tol)  # the same keys written, the rest untouched
    assert torch.equal(value, ref.value[0])
