"""Every function the compiled library exports, declared once: name, arguments, result and variants.

An entry's variants are the value dtypes (`dtypes`: float32, bfloat16, int8) times the column
encodings (`indexes`: int16, int32, or uint8 for 8-bit column deltas) it is built for; the C symbol is
the entry's name, then "_bf16" / "_i8" for a bfloat16 / int8 variant, then "_i16" / "_i32" / "_d8" where
the entry has index variants (`spmm_bf16_i16`, `spmm_i8_d8`). int8 variants read int8 weights with one
fp32 scale per row (the `scale` / `a_scale` / `b_scale` arguments, NULL for the float variants, where
a non-NULL one multiplies each row's sum just the same) and fp32 activations.
`build.kernel(name, dtype=…, index=…)` is the one lookup; no other module spells a symbol or a
ctypes signature. Arguments are (name, ctypes type) pairs in the order and with the names of the C
declaration in `csrc/kernels.h` (tests/test_kernel_table.py compares the two, and the library's
exported symbols with this table). Pointers are `c_void_p`: callers pass `tensor.data_ptr()`.

Adding a kernel: its `.c` file in `csrc/` (built automatically), its `CHTSL_EXPORT` declarations in
`csrc/kernels.h`, and one `KernelSpec` below.

The structs Python fills for `decode_layers` (`DecGroup`, `DecLayer`) are declared here too and
checked at load against the layout the library reports (`kernel_probe`): a difference fails loudly.

Compile-time choices — fixed when the library is built. `BUILD_VARIANTS` below are the ones the tuner
(`tune.py`) may compile as a second library from the same sources (-D flags, part of the build's
cache key) and choose on CPUs where they apply; the others are candidates for more:

- `TILE_VW` (csr_tiles.h): floats per tile vector, 16 with AVX-512 else 8 (variant `vw8`: 8 with AVX-512);
- `GATHER16` (gather.h): the int8 gather's and the AVX512-BF16 gather's 16 links per vgatherdps with
  AVX-512 (variant `g8`: 8 x values loaded one by one into a vector instead);
- the token tiles the kernels are specialised for (16, 32, 64: `ROWS`, `MM_ROWS`, `SDDMM_ROWS`)
  and `CSR_ROW_SUM`'s one or two accumulator sets;
- `SDDMM_ROW_CHUNK` (csr_train.c, 64 rows of DY transposed at once) and csr_mm_tm's 16-row output blocks;
- the gather loops' 4 (fp32) or 2 (bf16, int8) sum chains, `BF16_DP` (bf16.h: vdpbf16ps where
  available, in the 16-link gather);
- non-temporal stores of full fp32 tiles with AVX-512 (spmm.c `STREAM`);
- gemv.c's 4 × 8-float accumulators per token (int8: 4 × TILE_VW floats); lowrank_fm's single-thread
  threshold (2^18 multiply-adds; attn_decode's is a run-time setting);
- the flags themselves (`build.FLAG_SETS`: -O3 -march=native -fopenmp, …).

The run-time parameters (tile widths by token count, cache budgets, row chunks, work items) are in
`settings.py`.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

P, INT, LONG, FLOAT = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
F32, BF16, I8, I16, I32, U8 = torch.float32, torch.bfloat16, torch.int8, torch.int16, torch.int32, torch.uint8
DTYPE_SUFFIX = {F32: "", BF16: "_bf16", I8: "_i8"}  # int8: weights with per-row fp32 scales, fp32 activations
INDEX_SUFFIX = {I16: "_i16", I32: "_i32", U8: "_d8"}  # uint8: 8-bit column deltas (docs/formats.md §2)

CFunction = Callable[..., Any]  # a bound ctypes function


@dataclass(frozen=True)
class KernelSpec:
    """One exported C function and its variants.

    args: (name, ctypes type) per parameter, as in csrc/kernels.h; result: the return type (None: void).
    dtypes: the value dtypes it has variants for (empty: no dtype variants); indexes: the column-index
    widths it has variants for (empty: none). source: the defining file in csrc/.
    """

    name: str
    source: str
    args: tuple[tuple[str, Any], ...]
    result: Any = INT
    dtypes: tuple[torch.dtype, ...] = ()
    indexes: tuple[torch.dtype, ...] = ()

    def symbol(self, dtype: torch.dtype | None = None, index: torch.dtype | None = None) -> str:
        """The C symbol of one variant; LookupError if the table declares no such variant."""
        if (dtype is None) != (not self.dtypes) or (dtype is not None and dtype not in self.dtypes):
            raise LookupError(f"kernel {self.name!r} has dtype variants {self.dtypes or 'none'}, not {dtype}")
        if (index is None) != (not self.indexes) or (index is not None and index not in self.indexes):
            raise LookupError(f"kernel {self.name!r} has index variants {self.indexes or 'none'}, not {index}")
        return (self.name + ("" if dtype is None else DTYPE_SUFFIX[dtype])
                + ("" if index is None else INDEX_SUFFIX[index]))

    def symbols(self) -> list[str]:
        """Every variant's symbol."""
        return [self.symbol(d, i) for d in self.dtypes or (None,) for i in self.indexes or (None,)]


SPMM_ARGS = (("x", P), ("ldx", LONG), ("n_in", INT), ("n_tok", INT), ("crow", P), ("col", P), ("val", P),
             ("scale", P), ("rows", P), ("y", P), ("ldy", LONG), ("n_out", INT), ("tile", INT), ("n_chunks", INT),
             ("n_threads", INT))

TABLE = (
    KernelSpec("spmm", "spmm.c, spmm_bf16.c", SPMM_ARGS, dtypes=(F32, BF16, I8), indexes=(I16, I32, U8)),
    KernelSpec("csr_mm_tm", "csr_train.c", (
        ("x", P), ("ldx", LONG), ("n_tok", INT), ("n_cols", INT), ("crow", P), ("col", P), ("val", P),
        ("n_rows", INT), ("y", P), ("ldy", LONG), ("tile", INT), ("n_chunks", INT), ("n_threads", INT)),
        dtypes=(F32,)),
    KernelSpec("csr_sddmm_tm", "csr_train.c", (
        ("dy", P), ("lddy", LONG), ("x", P), ("ldx", LONG), ("n_tok", INT), ("n_rows", INT), ("n_cols", INT),
        ("crow", P), ("col", P), ("out", P), ("tile", INT), ("n_threads", INT)),
        dtypes=(F32,)),
    KernelSpec("csr_transpose", "csr_train.c", (
        ("crow", P), ("col", P), ("n_rows", INT), ("n_cols", INT), ("t_crow", P), ("t_row", P), ("t_perm", P))),
    KernelSpec("ch2_l3n_half", "ch_scores.c", (
        ("crow", P), ("col", P), ("tcrow", P), ("tcol", P), ("n_rows", INT), ("n_cols", INT), ("out", P),
        ("threads", INT))),
    KernelSpec("gemv", "gemv.c", (
        ("w", P), ("scale", P), ("n_out", INT), ("n_in", INT), ("x", P), ("ldx", LONG), ("n_tok", INT), ("y", P),
        ("ldy", LONG), ("threads", INT)),
        dtypes=(F32, BF16, I8)),
    KernelSpec("lowrank_fm", "gemv.c", (
        ("a", P), ("a_scale", P), ("n_rank", INT), ("n_in", INT), ("x", P), ("sx_in", LONG), ("sx_tok", LONG),
        ("n_tok", INT), ("b", P), ("b_scale", P), ("outs", P), ("ranks", P), ("n_members", INT), ("scale", FLOAT),
        ("act", INT), ("y", P), ("ldy", LONG), ("scratch", P), ("threads", INT)),
        dtypes=(F32, BF16, I8)),
    KernelSpec("rms_norm_fm", "decode.c", (
        ("h", P), ("ldh", LONG), ("n_feat", INT), ("n_tok", INT), ("w", P), ("eps", FLOAT), ("out", P),
        ("ldo", LONG)),
        result=None, dtypes=(F32, BF16)),
    KernelSpec("silu_mul_fm", "decode.c", (("gu", P), ("ld", LONG), ("ffn", INT), ("n_tok", INT), ("act", INT)),
               result=None, dtypes=(F32, BF16)),
    KernelSpec("attn_decode", "decode.c", (
        ("qkv", P), ("ldq", LONG), ("batch", INT), ("seq", INT), ("n_heads", INT), ("n_kv", INT),
        ("head_dim", INT), ("cos", P), ("sin", P), ("kcache", P), ("vcache", P), ("cap", INT), ("start", INT),
        ("scale", FLOAT), ("o", P), ("ldo", LONG), ("min_work", LONG), ("threads", INT)),
        dtypes=(F32, BF16)),
    KernelSpec("decode_layers", "decode.c", (
        ("h", P), ("hidden", INT), ("batch", INT), ("seq", INT), ("layers", P), ("n_layers", INT), ("kcache", P),
        ("vcache", P), ("eps", FLOAT), ("n_heads", INT), ("n_kv", INT), ("head_dim", INT), ("cos", P), ("sin", P),
        ("cap", INT), ("start", INT), ("attn_scale", FLOAT), ("tile", INT), ("item_bytes", LONG),
        ("attn_min_work", LONG), ("work", P), ("scratch", P), ("threads", INT)),
        dtypes=(F32, BF16)),
    KernelSpec("a8_pack", "spmm_a8.c", (
        ("crow", P), ("col", P), ("col_bytes", INT), ("val", P), ("n_rows", INT), ("n_in", INT), ("spill_cost", INT),
        ("steps", P), ("start", P), ("spill_n", P), ("spill_start", P), ("data", P), ("spill", P))),
    KernelSpec("spmm_a8", "spmm_a8.c", (
        ("x", P), ("ldx", LONG), ("n_in", INT), ("n_tok", INT), ("steps", P), ("start", P), ("data", P),
        ("spill_n", P), ("spill_start", P), ("spill", P), ("scale", P), ("rows", P), ("n_rows", INT), ("y", P),
        ("ldy", LONG), ("n_chunks", INT), ("n_threads", INT))),
    KernelSpec("gemv_a8", "spmm_a8.c", (
        ("w", P), ("scale", P), ("n_out", INT), ("n_in", INT), ("x", P), ("ldx", LONG), ("n_tok", INT), ("y", P),
        ("ldy", LONG), ("threads", INT))),
    KernelSpec("lowrank_fm_a8", "spmm_a8.c", (
        ("a", P), ("a_scale", P), ("n_rank", INT), ("n_in", INT), ("x", P), ("sx_in", LONG), ("sx_tok", LONG),
        ("n_tok", INT), ("b", P), ("b_scale", P), ("outs", P), ("ranks", P), ("n_members", INT), ("scale", FLOAT),
        ("act", INT), ("y", P), ("ldy", LONG), ("scratch", P), ("threads", INT))),
    KernelSpec("kernel_probe", "probe.c", (("buf", P), ("size", INT))),
)
KERNELS = {spec.name: spec for spec in TABLE}


@dataclass(frozen=True)
class BuildVariant:
    """A second build of the same sources with `defines` (-D flags added to the base build's), which the
    tuner times on CPUs where `applies(probe)` holds (probe: the base build's `kernel_probe` lines as
    key -> values) and uses where it is faster. It changes one code path (`path`: "tile", the spmm
    token-tile loops; "gather16", the int8/bf16 gather loops' vgatherdps): the tuner times it on the
    workloads that run that path (`workloads.Workload.paths`). Variants combine: a build's variant name
    is the accepted ones joined by "+" (e.g. "vw8+g8"), its flags all of theirs (`variant_defines`)."""

    name: str
    defines: tuple[str, ...]
    description: str
    applies: Callable[[dict[str, list[str]]], bool]
    path: str


BUILD_VARIANTS = {variant.name: variant for variant in (
    # 512-bit operations are double-pumped on AMD Zen 4 (two 256-bit halves); 8-float tile vectors
    # halve the registers the tile accumulators need.
    BuildVariant("vw8", ("-DCHTSL_TILE_VW=8",), "8-float tile vectors on an AVX-512 build (csr_tiles.h TILE_VW)",
                 lambda probed: probed.get("tile_vw") == ["16"], "tile"),
    # vgatherdps is microcoded on some CPUs: on AMD Zen 4 (2 cores, one token) the 8-link loop of x
    # values loaded one by one took 0.73–0.77× the time per int8 row and 0.65× per bf16 row.
    BuildVariant("g8", ("-DCHTSL_GATHER16=0",), "8-link gather loops on an AVX-512 build, no vgatherdps "
                 "(gather.h GATHER16)", lambda probed: probed.get("gather16") == ["1"], "gather16"),
)}


def variant_parts(name: str) -> list[BuildVariant]:
    """The build variants a variant name combines ("vw8+g8" -> vw8, g8; "" -> none); KeyError for an
    unknown part."""
    return [BUILD_VARIANTS[part] for part in name.split("+")] if name else []


def variant_defines(name: str) -> tuple[str, ...]:
    """The -D flags of variant name `name` (each part's, in order)."""
    return tuple(flag for spec in variant_parts(name) for flag in spec.defines)


def variant_applies(name: str, probed: dict[str, list[str]]) -> bool:
    """Whether every part of variant name `name` is known, applies to a base build that probed `probed`,
    and appears once."""
    try:
        parts = variant_parts(name)
    except KeyError:
        return False
    return len({p.name for p in parts}) == len(parts) and all(p.applies(probed) for p in parts)


@functools.cache
def symbol(name: str, dtype: torch.dtype | None = None, index: torch.dtype | None = None) -> str:
    """The C symbol of kernel `name`'s variant; LookupError for an unknown kernel or undeclared variant."""
    if name not in KERNELS:
        raise LookupError(f"no kernel {name!r} in the table; known: {', '.join(KERNELS)}")
    return KERNELS[name].symbol(dtype, index)


def bind(lib: ctypes.CDLL) -> dict[str, CFunction]:
    """Every variant of every entry, looked up in `lib` with its argument and result types set: symbol ->
    function. RuntimeError if the library lacks one (the table and csrc/ disagree)."""
    functions = {}
    for spec in TABLE:
        for name in spec.symbols():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise RuntimeError(f"the compiled kernels lack {name} (declared in chtsl_infer/kernels/table.py, "
                                   f"from csrc/{spec.source})") from None
            fn.argtypes = [ctype for _, ctype in spec.args]
            fn.restype = spec.result
            functions[name] = fn
    return functions


# --- Structs shared with C -------------------------------------------------------------------------

class A8Layout(ctypes.Structure):
    """csrc/kernels.h's `a8_layout`: a sparse matrix in spmm_a8.c's int8-activation layout (the pointers
    of a `sparse.A8Matrix`)."""
    _fields_ = [("steps", ctypes.c_void_p), ("data", ctypes.c_void_p), ("start", ctypes.c_void_p),
                ("spill_n", ctypes.c_void_p), ("spill", ctypes.c_void_p), ("spill_start", ctypes.c_void_p)]


class DecGroup(ctypes.Structure):
    """csrc/kernels.h's `dec_group`: one fused group's arguments to `decode_layers` (NULL crow / lora_a:
    part absent; `index`: `INDEX_CODES` of the columns; `int8`: int8 weights with their row scales)."""
    _fields_ = [("n_in", ctypes.c_int), ("n_out", ctypes.c_int), ("crow", ctypes.c_void_p),
                ("col", ctypes.c_void_p), ("values", ctypes.c_void_p), ("rows", ctypes.c_void_p),
                ("index", ctypes.c_int), ("lora_a", ctypes.c_void_p), ("lora_b", ctypes.c_void_p),
                ("outs", ctypes.c_void_p), ("ranks", ctypes.c_void_p), ("n_rank", ctypes.c_int),
                ("n_members", ctypes.c_int), ("scale", ctypes.c_float), ("act", ctypes.c_int),
                ("int8", ctypes.c_int), ("values_scale", ctypes.c_void_p), ("a_scale", ctypes.c_void_p),
                ("b_scale", ctypes.c_void_p), ("a8", A8Layout), ("a8_x", ctypes.c_void_p), ("a8_xs", ctypes.c_void_p)]


class DecLayer(ctypes.Structure):
    """csrc/kernels.h's `dec_layer`: a block's two norm weights and its four groups."""
    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("group", DecGroup * 4)]


STRUCTS: dict[str, type[ctypes.Structure]] = {  # C name -> ctypes, in kernel_probe's order
    "dec_group": DecGroup, "a8_layout": A8Layout, "dec_layer": DecLayer}
INDEX_CODES = {I16: 0, I32: 1, U8: 2}  # dec_group.index: the column encoding
A8_INDEX = 3  # dec_group.index of a group whose S is in spmm_a8.c's int8-activation layout


def ctypes_layout() -> list[str]:
    """The structs' layout as Python declares it, in `kernel_probe`'s "struct"/"field" line format."""
    lines = []
    for c_name, struct in STRUCTS.items():
        lines.append(f"struct {c_name} {ctypes.sizeof(struct)}")
        for field, _ in struct._fields_:
            descriptor = getattr(struct, field)
            lines.append(f"field {c_name}.{field} {descriptor.offset} {descriptor.size}")
    return lines


def probe(functions: dict[str, CFunction]) -> list[str]:
    """The lines `kernel_probe` writes (see csrc/probe.c)."""
    buf = ctypes.create_string_buffer(1 << 14)
    n = functions["kernel_probe"](buf, len(buf))
    if n < 0:
        raise RuntimeError("kernel_probe: its report does not fit the buffer")
    return buf.value.decode().splitlines()


def check_layouts(probed: list[str]) -> None:
    """RuntimeError naming the first difference between the C structs' layout (`probed`) and `STRUCTS`."""
    c_side = [line for line in probed if line.startswith(("struct ", "field "))]
    py_side = ctypes_layout()
    if c_side != py_side:
        diff = next((f"C has {c!r}, Python {p!r}" for c, p in zip(c_side, py_side, strict=False) if c != p),
                    f"C has {len(c_side)} lines, Python {len(py_side)}")
        raise RuntimeError(f"chtsl_infer/kernels/table.py's ctypes structs do not match csrc/kernels.h: {diff}")
