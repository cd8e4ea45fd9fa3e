"""`runtime.machine` (what `chtsl bench` measures of the machine) and the dense backend whose linears run
through the project's GEMV (`backends.dense_fm`), against torch's dense model."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from chtsl_infer import kernels
from chtsl_infer.errors import ChtslError
from chtsl_infer.runtime import machine
from chtsl_infer.runtime.backends import DENSE_PATHS, FusedLinears, dense_fm, from_packed, random_packed, set_dense_path
from tests.conftest import random_ids, tiny_config

needs_kernels = pytest.mark.skipif(not kernels.cpu_kernel_status()[0], reason="needs the compiled CPU kernels")


def _cache_dir(root: Path, entries: list[tuple[int, str, str]]) -> Path:
    for i, (level, kind, size) in enumerate(entries):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return root


def test_llc_is_the_highest_data_cache_level(tmp_path: Path) -> None:
    root = _cache_dir(tmp_path / "a", [(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"),
                                       (3, "Unified", "32768K")])
    assert machine.llc_bytes(root) == 32 << 20
    assert machine.llc_bytes(_cache_dir(tmp_path / "b", [(1, "Data", "48K"), (2, "Unified", "2M")])) == 2 << 20
    assert machine.llc_bytes(_cache_dir(tmp_path / "c", [(4, "Instruction", "1M")])) is None
    assert machine.llc_bytes(tmp_path / "missing") is None


def test_stream_buffer_is_four_llcs_at_least_the_floor_in_whole_rows() -> None:
    row = machine.GEMV_ROW * 4
    assert machine.stream_bytes(None) == machine.STREAM_MIN_BYTES
    assert machine.stream_bytes(1 << 20) == machine.STREAM_MIN_BYTES
    big = machine.stream_bytes(100_000_000)
    assert big >= 400_000_000 and big % row == 0 and big - 400_000_000 < row


def test_cpu_model_and_flags_from_cpuinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    x86 = ["processor\t: 0", "model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
           "flags\t\t: fpu sse avx avx2 fma avx512f avx512_bf16 amx_tile hypervisor"]
    monkeypatch.setattr(machine, "_cpuinfo", lambda: x86)
    assert machine.cpu_model() == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert machine.cpu_flags() == ["avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"]
    arm = ["processor\t: 0", "Features\t: fp asimd evtstrm sve bf16", "CPU part\t: 0xd40"]
    monkeypatch.setattr(machine, "_cpuinfo", lambda: arm)
    assert machine.cpu_model() == "0xd40" and machine.cpu_flags() == ["asimd", "sve", "bf16"]
    monkeypatch.setattr(machine, "_cpuinfo", lambda: [])
    assert machine.cpu_model() and machine.cpu_flags() == []


def _one_second_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """perf_counter advances by exactly 1 s per call: a timed region of one call takes 1 s."""
    clock = itertools.count()
    monkeypatch.setattr(machine.time, "perf_counter", lambda: float(next(clock)))


def test_stream_read_is_bytes_over_time_per_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    nbytes = 64 * machine.GEMV_ROW * 4
    _one_second_per_call(monkeypatch)
    rates = machine.stream_read(nbytes, repeats=2)
    assert set(rates) == ({"torch_sum", "gemv"} if kernels.cpu_kernel_status()[0] else {"torch_sum"})
    assert all(r == pytest.approx(nbytes / 1e9) for r in rates.values())  # 1 s per read of nbytes


def test_gemm_gflops_is_flops_over_time(monkeypatch: pytest.MonkeyPatch) -> None:
    _one_second_per_call(monkeypatch)
    assert machine.gemm_gflops(24, 16, 8) == pytest.approx(2 * 24 * 16 * 8 / 1e9)


def test_dense_group_shapes_are_the_dense_models_groups() -> None:
    config = tiny_config("dense", num_key_value_heads=2)
    rt = from_packed(random_packed(config), "dense")
    block = rt.model.model.layers[0]
    groups = [block.self_attn.q_proj.group, block.self_attn.o_proj.group, block.mlp.gate_proj.group,
              block.mlp.down_proj.group]
    assert machine.dense_group_shapes(config) == [tuple(g.weight.shape) for g in groups]


@needs_kernels
def test_time_dense_paths_times_the_paths_that_apply() -> None:
    shapes = [(48, 32), (32, 40)]
    times = machine.time_dense_paths(shapes, 1, torch.float32, repeats=2)
    assert set(times) == set(DENSE_PATHS) and all(t > 0 for t in times.values())
    assert set(machine.time_dense_paths(shapes, kernels.GEMV_MAX_TOKENS + 1, torch.float32, repeats=1)) == {"torch"}
    assert machine.dense_paths(2, torch.float16) == ("torch",)


@needs_kernels
def test_time_dense_paths_is_per_block_over_the_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = kernels.dense_gemv
    monkeypatch.setattr(kernels, "dense_gemv", lambda *a: calls.append(1) or real(*a))
    _one_second_per_call(monkeypatch)
    times = machine.time_dense_paths([(48, 32), (32, 40)], 2, torch.float32, blocks=4, repeats=3)
    assert times == {"torch": 0.25, "gemv": 0.25}  # 1 s per timed round of 4 blocks
    assert len(calls) == (3 + 1) * 4 * 2  # rounds (one untimed) × blocks × shapes


def test_stream_blocks_exceed_the_stream_buffer_up_to_the_models_blocks() -> None:
    shapes = [(1 << 20, 8)]  # 32 MiB per fp32 block
    assert machine.stream_blocks(shapes, 4, 100, None) == 8  # 8 × 32 MiB = 256 MiB
    assert machine.stream_blocks(shapes, 4, 100, 256 << 20) == 32  # 4 × a 256 MiB cache
    assert machine.stream_blocks(shapes, 4, 5, None) == 5 and machine.stream_blocks(shapes, 2, 100, None) == 16
    assert machine.stream_blocks([(1 << 20, 1024)], 4, 22, None) == 1  # one 4 GiB block


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_tok", [1, 2, 3, 4, 5])
def test_dense_fm_gemv_equals_torch_mm(dtype: torch.dtype, n_tok: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = kernels.dense_gemv
    monkeypatch.setattr(kernels, "dense_gemv", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(n_tok)
    w = torch.randn(70, 45, generator=gen).to(dtype)
    x = torch.randn(45, n_tok, generator=gen).to(dtype)
    out = torch.full((70, n_tok), float("nan"), dtype=dtype)
    assert dense_fm(w, x, out, "gemv") is out
    reference = w.double() @ x.double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # fp32 sums; bf16 output rounded once
    torch.testing.assert_close(out.double(), reference, atol=tol, rtol=tol)
    assert len(calls) == (n_tok <= kernels.GEMV_MAX_TOKENS)  # more tokens: torch's GEMM
    torch.testing.assert_close(dense_fm(w, x, torch.empty_like(out), "torch").double(), reference, atol=tol, rtol=tol)
    assert len(calls) == (n_tok <= kernels.GEMV_MAX_TOKENS)


def test_set_dense_path_rejects_an_unknown_path() -> None:
    rt = from_packed(random_packed(tiny_config("dense")), "dense")
    with pytest.raises(ChtslError, match="unknown dense path 'mkl'"):
        set_dense_path(rt.model, "mkl")
    set_dense_path(rt.model, "gemv")
    assert {m.dense_path for m in rt.model.modules() if isinstance(m, FusedLinears)} == {"gemv"}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_backend_on_the_gemv_decodes_as_torchs_dense_model(dtype: torch.dtype,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense baseline bench may pick: the prefill on torch (7 tokens), then steps of 1 and 3 tokens
    through `csrc/gemv.c` for every dense group; logits within fp32 (bf16) tolerance of the torch path
    and (fp32) the same greedy tokens."""
    packed = random_packed(tiny_config("dense", num_key_value_heads=2), seed=5)
    reference = from_packed(packed, "dense", dtype=dtype)
    rt = from_packed(packed, "dense", dtype=dtype)
    set_dense_path(rt.model, "gemv")
    calls = []
    real = kernels.dense_gemv
    monkeypatch.setattr(kernels, "dense_gemv", lambda w, *a, **k: calls.append(w.shape) or real(w, *a, **k))
    ids = random_ids(1, 11, seed=3)
    caches = [r.new_cache(1, 16) for r in (reference, rt)]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for feed in (ids[:, :7], ids[:, 7:8], ids[:, 8:11]):
        want, got = (r.decode_step(feed, c) for r, c in zip((reference, rt), caches, strict=True))
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    groups = 4 * rt.config.num_hidden_layers
    lm_head = 3 * 2  # both runtimes' lm_head (one sequence's last position) at every step
    assert len(calls) == 2 * groups + lm_head  # the groups at the 1- and 3-token steps; the prefill on torch
    if dtype == torch.float32:  # bf16 logits differ by roundings: a near tie may pick another token
        torch.testing.assert_close(rt.generate(ids, 5), reference.generate(ids, 5), atol=0, rtol=0)
