"""The kernel table against the C side (exported symbols, declarations, struct layout), the run-time
settings, and the validated kernel cache (damaged entries, flag-set fallback, concurrent first uses)."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chtsl_infer import kernels
from chtsl_infer.kernels import build, table
from chtsl_infer.kernels.settings import KernelSettings, override, settings
from chtsl_infer.kernels.tune import CANDIDATES

ROOT = Path(__file__).resolve().parents[1]
C_TYPES = {"int": ctypes.c_int, "long": ctypes.c_long, "float": ctypes.c_float, "double": ctypes.c_double}


def _library() -> build.Library:
    lib, how = build.library()
    if lib is None:
        pytest.skip(f"no compiled kernels: {how}")
    return lib


def _declarations() -> dict[str, tuple[object, list[tuple[str, object]]]]:
    """csrc/kernels.h's CHTSL_EXPORT declarations: symbol -> (result ctype, [(parameter, ctype)]), read
    from the preprocessed header (declarations written through a macro expanded), CHTSL_EXPORT kept."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("needs a C compiler to preprocess kernels.h")
    text = subprocess.run([cc, "-E", "-P", "-DCHTSL_EXPORT=CHTSL_EXPORT", "-x", "c", str(build.CSRC / "kernels.h")],
                          capture_output=True, text=True, check=True).stdout
    decls = {}
    for result, name, params in re.findall(r"\bCHTSL_EXPORT\s+(\w+)\s+(\w+)\(([^)]*)\);", text):
        args = []
        for param in " ".join(params.split()).split(", "):
            words = param.replace("*", " * ").split()
            args.append((words[-1], ctypes.c_void_p if "*" in words else C_TYPES[words[-2]]))
        decls[name] = (None if result == "void" else C_TYPES[result], args)
    return decls


def test_table_matches_the_c_declarations() -> None:
    """Every table variant is declared CHTSL_EXPORT in kernels.h with the same parameter names, types
    and result, and every such declaration is in the table."""
    decls = _declarations()
    symbols = {s: spec for spec in table.TABLE for s in spec.symbols()}
    assert len(decls) >= 20 and set(decls) == set(symbols)
    for name, spec in symbols.items():
        result, args = decls[name]
        assert (result, args) == (spec.result, list(spec.args)), name


def test_table_covers_exactly_the_exported_symbols() -> None:
    """The built library exports the table's symbols and nothing else (-fvisibility=hidden)."""
    lib = _library()
    nm = shutil.which("nm")
    if nm is None or sys.platform != "linux":
        pytest.skip("needs GNU nm on Linux")
    listing = subprocess.run([nm, "-D", "--defined-only", str(lib.path)], capture_output=True, text=True,
                             check=True).stdout
    exported = {parts[2] for parts in map(str.split, listing.splitlines()) if len(parts) == 3 and parts[1] == "T"}
    assert exported == {s for spec in table.TABLE for s in spec.symbols()}
    assert set(lib.functions) == exported


def test_struct_layout_is_checked_against_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library's own report of dec_group/a8_layout/dec_layer equals the ctypes structs; a ctypes struct that
    drifts from the C one (a field of another size) fails the load loudly."""
    lib = _library()
    layout = [line for line in lib.probe if line.startswith(("struct ", "field "))]
    assert layout == table.ctypes_layout() and "field dec_group.scale 88 4" in layout  # LP64
    assert len(layout) == len(table.STRUCTS) + sum(len(struct._fields_) for struct in table.STRUCTS.values())

    class Drifted(ctypes.Structure):
        _fields_ = [(n, ctypes.c_double if n == "scale" else t) for n, t in table.DecGroup._fields_]

    monkeypatch.setitem(table.STRUCTS, "dec_group", Drifted)
    with pytest.raises(RuntimeError, match=r"do not match csrc/kernels.h.*dec_group"):
        table.check_layouts(list(lib.probe))
    with pytest.raises(RuntimeError, match="do not match"):
        build._load(lib.path, lib.compiler, lib.flags)


def test_one_lookup_picks_each_variant() -> None:
    lib = _library()
    f32, bf16, i16, i32 = torch.float32, torch.bfloat16, torch.int16, torch.int32
    assert kernels.kernel("spmm", dtype=bf16, index=i16) is lib.functions["spmm_bf16_i16"]
    assert kernels.kernel("spmm", dtype=f32, index=i32) is lib.functions["spmm_i32"]
    assert kernels.kernel("gemv", dtype=f32) is lib.functions["gemv"]
    assert kernels.kernel("csr_transpose") is lib.functions["csr_transpose"]
    for name, dtype, index in (("spmm", torch.float64, i16), ("spmm", f32, None), ("csr_mm_tm", bf16, None),
                               ("csr_transpose", f32, None), ("gemv", f32, i32), ("no_such_kernel", None, None)):
        with pytest.raises(LookupError):
            kernels.kernel(name, dtype=dtype, index=index)
    x, b = torch.zeros(2), torch.zeros(2, dtype=bf16)
    assert kernels.cpu_kernel("spmm", x, x, index=i16) is lib.functions["spmm_i16"]
    assert kernels.cpu_kernel("spmm", x, b, index=i16) is None  # mixed dtypes: torch's path
    assert kernels.cpu_kernel("spmm", x, index=torch.int64) is None
    assert kernels.cpu_kernel("csr_mm_tm", b) is None and kernels.cpu_kernel("csr_mm_tm", x.to("meta")) is None
    info = kernels.kernel_info()
    assert info.available and info.path == str(lib.path) and info.tile_vw in (8, 16)
    assert info.tile_vw == (16 if "avx512f" in info.isa else 8) and info.settings == vars(settings())


# --- run-time settings ------------------------------------------------------------------------------

def test_settings_defaults_rules_and_validation() -> None:
    s = KernelSettings()
    assert (s.tile_bytes, s.mm_tile, s.sddmm_tile, s.sddmm_tile_bytes, s.gather_below, s.chunks_per_thread,
            s.decode_item_bytes, s.attn_min_work, s.widen_deltas) == (1 << 20, 32, 64, 256 << 10, 3, 2, 64 << 10,
                                                                     1 << 14, 1)  # AVX2's
    assert [s.token_tile(1000, n) for n in (1, 2, 3, 16, 17, 32, 33, 500)] == [0, 0, 16, 16, 32, 32, 64, 64]
    assert s.token_tile(5000, 100) == 32  # 5000 × 64 floats exceed tile_bytes
    assert [s.train_tile(n) for n in (1, 16, 17, 32, 33)] == [16, 16, 32, 32, 32]
    assert [s.sddmm_tile_for(n, 500) for n in (5, 20, 100)] == [16, 32, 64] and s.sddmm_tile_for(100, 2000) == 32
    assert [s.row_chunks(t, 2) for t in (1, 2, 9)] == [4, 1, 1] and s.row_chunks(1, 4) == 8
    with override(mm_tile=64, gather_below=0) as changed:
        assert settings() is changed and changed.train_tile(100) == 64 and changed.token_tile(10, 1) == 16
    assert settings() == s
    for bad in ({"mm_tile": 48}, {"sddmm_tile": 128}, {"tile_bytes": 0}, {"gather_below": -1},
                {"chunks_per_thread": 1.5}, {"decode_item_bytes": True}, {"widen_deltas": 2}, {"widen_deltas": -1}):
        with pytest.raises(ValueError, match="KernelSettings"):
            KernelSettings(**bad)


# Every value the tuner tries (chtsl_infer/kernels/tune.py CANDIDATES) other than the default, one at a time.
TUNER_PICKS = [{name: value} for name, values in CANDIDATES.items() for value in values
               if value != getattr(KernelSettings(), name)]


@pytest.mark.parametrize("changes", [
    {}, {"tile_bytes": 1}, {"gather_below": 0}, {"gather_below": 17}, {"chunks_per_thread": 5},
    {"mm_tile": 16, "sddmm_tile": 16}, {"mm_tile": 64, "sddmm_tile": 32}, {"sddmm_tile_bytes": 1},
    *TUNER_PICKS,
])
def test_every_setting_a_tuner_may_pick_computes_the_same_products(changes: dict[str, int]) -> None:
    """spmm (fp32, bf16), csr_mm and csr_sddmm under other settings still equal the dense references."""
    _library()
    g = torch.Generator().manual_seed(len(changes))
    mask = torch.rand(70, 90, generator=g) < 0.2
    w = torch.randn(70, 90, generator=g) * mask
    crow = torch.zeros(71, dtype=torch.int32)
    crow[1:] = mask.sum(1).cumsum(0)
    col = mask.nonzero()[:, 1].to(torch.int32)
    with override(**changes):
        for n_tok in (1, 2, 5, 20, 70):
            x = torch.randn(90, n_tok, generator=g)
            torch.testing.assert_close(kernels.spmm_cpu(x, crow, col.short(), w[mask]), w @ x, atol=1e-5, rtol=1e-5)
            got = kernels.spmm_cpu(x.bfloat16(), crow, col, w[mask].bfloat16())
            want = w.bfloat16().double() @ x.bfloat16().double()
            torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=2**-7)
            dy = torch.randn(n_tok, 70, generator=g)
            torch.testing.assert_close(kernels.csr_mm(x.t(), crow, col, w[mask], 70), x.t() @ w.t(), atol=1e-5,
                                       rtol=1e-5)
            torch.testing.assert_close(kernels.csr_sddmm(dy, x.t(), crow, col, 90), (dy.t() @ x.t())[mask],
                                       atol=1e-4, rtol=1e-5)


# --- the validated cache ----------------------------------------------------------------------------

QUICK = (("-O0",),)  # one quick flag set (~2 s to build) for the cache tests; the real sets take ~20 s

# Every kernel user once, each against torch: spmm (fp32, bf16), the decode kernels through a runtime's
# generate, csr_linear's forward and backward (csr_mm, csr_sddmm, csr_transpose), the CH2-L3n scores.
USERS = """
import sys
import torch
from chtsl_infer.kernels import build
build.FLAG_SETS = {flags!r}
from chtsl_infer import kernels
from chtsl_infer.model.csr import CsrStructure, csr_linear
from chtsl_infer.model.presets import build_config
from chtsl_infer.runtime.backends import from_packed, random_packed
from train.topology import ch2_l3n_scores, ch2_l3n_scores_dense

assert kernels.cpu_kernel_status()[0] == (sys.argv[1] == "compiled"), kernels.cpu_kernel_status()
g = torch.Generator().manual_seed(0)
mask = torch.rand(24, 40, generator=g) < 0.3
w = torch.randn(24, 40, generator=g) * mask
crow = torch.zeros(25, dtype=torch.int32)
crow[1:] = mask.sum(1).cumsum(0)
col = mask.nonzero()[:, 1].to(torch.int32)
x = torch.randn(40, 3, generator=g)
torch.testing.assert_close(kernels.spmm_cpu(x, crow, col.short(), w[mask]), w @ x)
torch.testing.assert_close(kernels.spmm_cpu(x.bfloat16(), crow, col, w[mask].bfloat16()).float(), w @ x,
                           atol=0.1, rtol=0.05)
st = CsrStructure.from_crow_col(crow, col, 40)
xs = torch.randn(5, 40, generator=g, requires_grad=True)
values = w[mask].clone().requires_grad_(True)
csr_linear(xs, values, st).sum().backward()
torch.testing.assert_close(values.grad, torch.ones(5, 24).t().mm(xs.detach())[mask])
torch.testing.assert_close(ch2_l3n_scores(mask), ch2_l3n_scores_dense(mask))
config = build_config("tiny", method="chtsl", s_total=0.9, num_hidden_layers=2, vocab_size=64,
                      max_position_embeddings=32)
packed = random_packed(config, seed=0)
ids = torch.randint(0, 64, (1, 5), generator=g)
tokens = [from_packed(packed, b).generate(ids, max_new_tokens=3) for b in ("sparse", "dense")]
assert torch.equal(tokens[0], tokens[1]), tokens
print("ok")
"""


def _cache_with_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """(cache root, a built library entry in it, the compiler script it was built with) — a quick build."""
    real_cc = shutil.which("cc") or shutil.which("gcc")
    if real_cc is None:
        pytest.skip("no C compiler")
    cc = tmp_path / "bin" / "cc"
    cc.parent.mkdir()
    cc.write_text(f'#!/bin/sh\nexec {real_cc} "$@"\n')
    cc.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CHTSL_CACHE_DIR", str(cache))
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(build, "FLAG_SETS", QUICK)
    lib, how, note = build._compile()
    assert lib is not None and note == "", how
    return cache, lib.path, cc


def _replace_bytes(path: Path, data: bytes) -> None:
    """Puts `data` at `path` as a new file: this process has the built library mapped (`_compile` loaded
    it), and truncating or overwriting that inode in place would crash it with SIGBUS on its next touch."""
    tmp = path.with_name(path.name + ".damage")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    _replace_bytes(path, os.urandom(len(data)) if how == "random" else data[:int(how)])


def _run_users(cache: Path, cc: Path, expect: str) -> subprocess.Popen[str]:
    env = {**os.environ, "CHTSL_CACHE_DIR": str(cache), "CC": str(cc), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", USERS.format(flags=QUICK), expect], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen[str]) -> tuple[str, list[str]]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err  # -7 would be SIGBUS
    assert out.strip().endswith("ok")
    return out, err.strip().splitlines()


def test_verify_tells_an_intact_entry_from_a_damaged_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, entry, _ = _cache_with_entry(tmp_path, monkeypatch)
    size = entry.stat().st_size
    assert build.verify(entry) is None and size > 40_000
    intact = entry.read_bytes()
    for how, why in (("1000", f"1000 bytes where {size}"), ("40000", f"40000 bytes where {size}"),
                     ("random", "checksum differs")):
        _damage(entry, how)
        assert why in build.verify(entry)
        _replace_bytes(entry, intact)
    build.record_path(entry).write_text("{not json")
    assert "unreadable build record" in build.verify(entry)
    build.record_path(entry).unlink()
    assert build.verify(entry) == "no build record"
    entry.unlink()
    assert build.verify(entry) == build.NOT_BUILT


@pytest.mark.parametrize(("damage", "compiler"), [
    ("40000", True),
    ("random", False),
    pytest.param("1000", True, marks=pytest.mark.slow),
    pytest.param("random", True, marks=pytest.mark.slow),
    pytest.param("1000", False, marks=pytest.mark.slow),
])
def test_a_damaged_cache_entry_is_rebuilt_or_bypassed_with_one_warning(
        damage: str, compiler: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A truncated or overwritten library in the cache (which dlopen would map and then crash on with
    SIGBUS): a fresh process rebuilds it — or, with no compiler, uses torch — prints one warning line,
    and every kernel user works."""
    cache, entry, cc = _cache_with_entry(tmp_path, monkeypatch)
    _damage(entry, damage)
    if not compiler:
        cc.unlink()
    _, err = _finish(_run_users(cache, cc, "compiled" if compiler else "torch"))
    assert len(err) == 1 and err[0].startswith("warning: ") and "damaged" in err[0], err
    if compiler:
        assert "rebuilt" in err[0] and build.verify(entry) is None
    else:
        assert "using torch" in err[0] and "not found" in err[0] and build.verify(entry) is not None


@pytest.mark.slow  # two processes building at once
@pytest.mark.parametrize("start", ["empty", "damaged"])
def test_concurrent_first_uses_leave_a_valid_cache(start: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes that find no library (or the same damaged one) both build it aside and rename it
    into place: both work, neither warns about an empty cache (a damaged entry: at most one line each,
    from whichever found it damaged), and the cache ends valid with no temporary files."""
    cache, entry, cc = _cache_with_entry(tmp_path, monkeypatch)
    if start == "empty":
        entry.unlink()
        build.record_path(entry).unlink()
    else:
        _damage(entry, "40000")
    procs = [_run_users(cache, cc, "compiled") for _ in range(2)]
    for proc in procs:
        _, err = _finish(proc)
        assert err == [] if start == "empty" else len(err) <= 1 and all("damaged" in line for line in err), err
    assert build.verify(entry) is None
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted([entry.name, build.record_path(entry).name])


def test_a_flag_set_that_fails_is_said_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The first flag set does not compile: the next one is built, with one warning line naming the
    failure; later loads skip the failed set silently (it is recorded)."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("CHTSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "cc")
    monkeypatch.setattr(build, "FLAG_SETS", (("-O0", "-fno-such-flag-chtsl"), ("-O0",)))
    lib, how = build.library.__wrapped__()
    err = capsys.readouterr().err.splitlines()
    assert lib is not None and lib.flags == ("-O0",) and "cc -O0 (" in how
    assert len(err) == 1 and "built the CPU kernels with `cc -O0` after" in err[0] and "no-such-flag" in err[0], err
    assert len(list((tmp_path / "kernels").glob("*.failed"))) == 1
    lib, how, note = build._compile()
    assert lib is not None and lib.flags == ("-O0",) and note == ""
