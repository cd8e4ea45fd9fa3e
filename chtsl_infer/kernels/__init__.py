"""Sparse-times-dense kernels for the sparse branch, feature-major: `Y = S X`.

Shapes: S (out, in) as CSR — crow int32 (out+1,), col int16/int32 (nnz,), values fp32 (nnz,) —,
X (in, T) and Y (out, T) with T = tokens. The inference runtime keeps activations feature-major
(`chtsl_infer.runtime.feature_major`) so neither side needs a transpose.

CPU (`spmm_cpu`): the C kernel in `csrc/spmm.c`, compiled on first use with the host C compiler
(`$CC`, else `cc`; `-O3 -march=native`, OpenMP when available) into
`$CHTSL_CACHE_DIR/kernels` (default `~/.cache/chtsl/kernels`), keyed by the sources (the .c files
and the header they share, `csrc/csr_tiles.h`), the flags and
the host CPU's feature flags (so a shared home on a mixed cluster never loads code built for
another CPU), and called through ctypes (which releases the GIL). It shares torch's OpenMP
runtime (`libgomp.so.1` is already loaded by torch) and uses torch's intra-op thread count.
Why C and not numba (the previous kernel): numba/LLVM picked 256-bit vectors and spilled the
accumulators; the explicit 16-float vectors run 1.5–2.5× faster (`benchmarks/kernels.py`).
Without a working compiler, `spmm_cpu` falls back to torch's CSR matmul (correct, slower) and
`cpu_kernel_status()` says why.

CUDA (`spmm_cuda`): torch's CSR matmul (cuSPARSE).

Training (`csr_mm`, `csr_sddmm`; used by `chtsl_infer.model.csr.csr_linear`): token-major activations
(N, in), as the trainer holds them. `csr_mm` is `x Aᵀ` (the forward on S, dx on its transpose) and
`csr_sddmm` the values' gradient at the links. CPU float32: the C kernels in `csrc/csr_train.c`,
built into the same library as `spmm.c`; otherwise (CUDA, float64, no compiler) torch's sparse CSR
ops — `@` (cuSPARSE SpMM on CUDA) and `torch.sparse.sampled_addmm` (cuSPARSE SDDMM). Measured on
one loaded AMD EPYC (AVX2) core at 512 tokens and 5 % density (`benchmarks/train_kernels.py`):
each of the three takes 0.05–0.06× the dense layer's forward + backward, the three together
0.15–0.18×, where the torch ops take 0.6×.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from chtsl_infer.utils import cache_dir

HEADERS = tuple(Path(__file__).with_name("csrc") / name  # included by SOURCES: part of the cache key
                for name in ("csr_tiles.h", "activation.h", "bf16.h", "kernels.h"))
SOURCES = tuple(Path(__file__).with_name("csrc") / name  # built into one library
                for name in ("spmm.c", "csr_train.c", "spmm_bf16.c", "ch_scores.c", "gemv.c", "decode.c"))
TILE_BYTES = 1 << 20  # tile of 64 tokens while its buffer (in × 64 fp32) fits in this much of L2, else 32
MM_TILE = 32  # tokens per tile of csr_mm_tm (training forward and dx): 4 × 2 AVX2 accumulators, measured best
SDDMM_TILE = 64  # tokens per tile of csr_sddmm_tm, while its (in × tile) buffer fits SDDMM_TILE_BYTES, else 32
SDDMM_TILE_BYTES = 256 << 10  # half of a 512 KiB L2
GEMV_MAX_TOKENS = 4  # dense_gemv serves 1..4 tokens (decoding); more go to torch's GEMM
GATHER_BELOW = 3  # fewer tokens: per-token gather loop, else 16-token vectors (measured crossover: 2–4)
CHUNKS_PER_THREAD = 2  # row chunks per thread when a call has fewer token tiles than threads (decoding)
DECODE_ITEM_BYTES = 64 << 10  # decode_layers: the sparse and A rows of a group in work items of about this size
FLAG_SETS = (  # tried in order until one compiles
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-mcpu=native", "-fopenmp"),  # arm64 compilers spell it -mcpu
    ("-O3", "-march=native"),  # no OpenMP (e.g. Apple clang): single-threaded
    ("-O3",),
)


def _cpu_fingerprint() -> str:
    """The host CPU's identity for the cache key: its feature flags where the OS lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> Path:
    return cache_dir() / "kernels"


def _cache_key(compiler: str, flags: tuple[str, ...]) -> str:
    """16 hex digits naming a built library: its sources and headers, compiler, flags and the host CPU."""
    source = b"\0".join(path.read_bytes() for path in SOURCES + HEADERS)
    return hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                      _cpu_fingerprint().encode()])).hexdigest()[:16]


def _compile() -> tuple[ctypes.CDLL | None, str]:
    """(library, how it was built) or (None, why not)."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        return None, f"no C compiler: {compiler!r} not found (set CC)"
    errors = []
    for flags in FLAG_SETS:
        target = _cache_dir() / f"spmm-{_cache_key(compiler, flags)}.so"
        if not target.exists():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, then rename:
                    tmp_lib = Path(tmp) / target.name  # concurrent first uses never load a partial file
                    run = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", str(tmp_lib),
                                          *map(str, SOURCES), "-lm"],
                                         capture_output=True, text=True, timeout=120)
                    if run.returncode != 0:
                        errors.append(f"{compiler} {' '.join(flags)}: {run.stderr.strip().splitlines()[-1:]}")
                        continue
                    os.replace(tmp_lib, target)
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{compiler} {' '.join(flags)}: {exc}")
                continue
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as exc:
            errors.append(f"loading {target}: {exc}")
            continue
        p, i, lng = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        for fn in (lib.spmm_i16, lib.spmm_i32, lib.spmm_bf16_i16, lib.spmm_bf16_i32):
            fn.argtypes = [p, lng, i, i, p, p, p, p, p, lng, i, i, i, i]
            fn.restype = i
        lib.spmm_bf16_path.argtypes, lib.spmm_bf16_path.restype = [], i
        lib.csr_mm_tm.argtypes = [p, lng, i, i, p, p, p, i, p, lng, i, i, i]
        lib.csr_mm_tm.restype = i
        lib.csr_sddmm_tm.argtypes = [p, lng, p, lng, i, i, i, p, p, p, i, i]
        lib.csr_sddmm_tm.restype = i
        lib.csr_transpose.argtypes = [p, p, i, i, p, p, p]
        lib.csr_transpose.restype = i
        lib.ch2_l3n_half.argtypes = [p, p, p, p, i, i, p, i]
        lib.ch2_l3n_half.restype = i
        for fn in (lib.gemv_f32, lib.gemv_bf16):
            fn.argtypes = [p, i, i, p, lng, i, p, lng, i]
            fn.restype = i
        for fn in (lib.lowrank_fm, lib.lowrank_fm_bf16):
            fn.argtypes = [p, i, i, p, lng, lng, i, p, p, p, i, ctypes.c_float, i, p, lng, p, i]
            fn.restype = i
        f = ctypes.c_float
        for suffix in ("", "_bf16"):  # csrc/decode.c: fp32 and bf16 variants
            rms, silu, attn = (getattr(lib, name + suffix) for name in ("rms_norm_fm", "silu_mul_fm", "attn_decode"))
            rms.argtypes, rms.restype = [p, lng, i, i, p, f, p, lng], None
            silu.argtypes, silu.restype = [p, lng, i, i, i], None
            attn.argtypes, attn.restype = [p, lng, i, i, i, i, i, p, p, p, p, i, i, f, p, lng, i], i
            layers = getattr(lib, "decode_layers" + suffix)
            layers.argtypes = [p, i, i, i, p, i, p, p, f, i, i, i, p, p, i, i, f, i, lng, p, p, i]
            layers.restype = i
        return lib, f"{compiler} {' '.join(flags)} ({target})"
    return None, "; ".join(errors) or "no compiler"


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    lib, how = _compile()
    if lib is None:  # once per process: the sparse backend still works, only slower
        warnings.warn(f"chtsl: the CPU sparse kernel could not be built ({how}); "
                      "using torch's CSR matmul instead (slower)", RuntimeWarning, stacklevel=3)
    return lib, how


def token_tile(n_in: int, n_tok: int) -> int:
    """Tokens per task of the CPU kernel; 0 = the per-token gather loop (decoding).

    Tiles are vectors of 16 tokens: the smallest of 16/32/64 covering n_tok (a short batch is not
    padded to 64), 64 only while its (n_in × 64) buffer fits in `TILE_BYTES` of L2.
    """
    if n_tok < GATHER_BELOW:
        return 0
    if n_tok <= 16:
        return 16
    return 32 if n_tok <= 32 or n_in * 64 * 4 > TILE_BYTES else 64


def cpu_kernel_status() -> tuple[bool, str]:
    """(whether the compiled CPU kernel is in use, how it was built or why it is not)."""
    lib, how = _library()
    return lib is not None, how


def bf16_path() -> str:
    """Which bf16 gather loop the compiled kernel has: "avx512-bf16" (vdpbf16ps), "portable" or "none"."""
    lib, _ = _library()
    if lib is None:
        return "none"
    return "avx512-bf16" if lib.spmm_bf16_path() else "portable"


def spmm_cpu(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
             out: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """`S X` on CPU: x (in, T) with contiguous rows -> (out, T); S a CSR triple (out rows).

    float32 x and values: fp32 throughout (`csrc/spmm.c`). bfloat16 x and values: bf16 in memory,
    fp32 accumulation, the result rounded to bf16 (`csrc/spmm_bf16.c`).
    `out`, if given, is a (out, T) tensor of x's dtype with contiguous rows the result is written into.
    `rows` (int32, out): stored CSR row r is output row rows[r] (see `sort_rows`); None: identity.
    """
    dtype = x.dtype
    if dtype not in (torch.float32, torch.bfloat16) or values.dtype != dtype:
        raise TypeError(f"spmm_cpu computes float32 or bfloat16 (x and values alike), got x {x.dtype} and "
                        f"values {values.dtype}")
    n_in, n_tok = x.shape
    if x.stride(1) != 1 or x.stride(0) < n_tok:  # the kernel reads rows of n_tok contiguous values
        x = x.contiguous()
    n_out = crow.numel() - 1
    if out is not None and (out.shape != (n_out, n_tok) or out.dtype != dtype or out.device.type != "cpu"
                            or out.stride(1) != 1 or out.stride(0) < n_tok):
        raise ValueError(f"spmm_cpu: out must be a CPU {dtype} ({n_out}, {n_tok}) tensor with contiguous rows")
    y = torch.empty(n_out, n_tok, dtype=dtype) if out is None else out
    if n_tok == 0 or n_out == 0:
        return y.zero_()
    lib, _ = _library()
    if lib is None:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            csr = torch.sparse_csr_tensor(crow.long(), col.long(), values.float(), size=(n_out, n_in),
                                          check_invariants=False)
            result = csr @ x.float()
        if rows is None:
            return y.copy_(result)
        y[rows.long()] = result.to(dtype)
        return y
    threads = torch.get_num_threads()
    tile = token_tile(n_in, n_tok)
    n_tiles = 1 if tile == 0 else -(-n_tok // tile)
    n_chunks = max(1, -(-CHUNKS_PER_THREAD * threads // n_tiles)) if n_tiles < threads else 1  # few tokens: split rows
    if col.dtype not in (torch.int16, torch.int32) or crow.dtype != torch.int32:
        raise TypeError(f"spmm_cpu reads int32 row pointers and int16/int32 columns, got {crow.dtype}/{col.dtype}")
    if dtype == torch.float32:
        fn = lib.spmm_i16 if col.dtype == torch.int16 else lib.spmm_i32
    else:
        fn = lib.spmm_bf16_i16 if col.dtype == torch.int16 else lib.spmm_bf16_i32
    if rows is not None and (rows.dtype != torch.int32 or rows.numel() != n_out or not rows.is_contiguous()):
        raise TypeError(f"spmm_cpu: rows must be a contiguous int32 permutation of {n_out} rows")
    if fn(x.data_ptr(), x.stride(0), n_in, n_tok, crow.data_ptr(), col.data_ptr(), values.data_ptr(),
          None if rows is None else rows.data_ptr(), y.data_ptr(), y.stride(0), n_out, tile, n_chunks, threads):
        raise MemoryError("spmm_cpu: could not allocate the kernel's buffers")
    return y


def ch2_l3n_half(crow: torch.Tensor, col: torch.Tensor, tcrow: torch.Tensor, tcol: torch.Tensor,
                 shape: tuple[int, int]) -> torch.Tensor:
    """One half of the CH2-L3n scores of a 0/1 CPU matrix M (n_rows, n_cols), float64 (n_rows, n_cols):
    `Σ_v P[u, v] M[v, j]` with P from D = M Mᵀ and M's row degrees (`csrc/ch_scores.c`); the scores
    are `half(M) + half(Mᵀ)ᵀ`. M is given as CSR (crow, col) and its transpose as (tcrow, tcol), any
    integer dtypes (`model.csr.mask_to_csr`). Needs the compiled kernels (`cpu_kernel_status`)."""
    lib, how = _library()
    if lib is None:
        raise RuntimeError(f"ch2_l3n_half needs the compiled CPU kernels: {how}")
    n_rows, n_cols = shape
    crow, col, tcrow, tcol = (t.to(torch.int32).contiguous() for t in (crow, col, tcrow, tcol))
    out = torch.zeros(n_rows, n_cols, dtype=torch.float64)
    if lib.ch2_l3n_half(crow.data_ptr(), col.data_ptr(), tcrow.data_ptr(), tcol.data_ptr(), n_rows, n_cols,
                        out.data_ptr(), torch.get_num_threads()):
        raise MemoryError("ch2_l3n_half: could not allocate the kernel's buffers")
    return out


def sort_rows(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The CSR with its rows stored by increasing link count: (crow, col, values, rows int32).

    `rows[r]` is the output row of stored row r (pass it to `spmm_cpu`). Runs of equal-length rows
    let the CPU predict the kernel's per-row loop exits.
    """
    counts = (crow[1:] - crow[:-1]).long()
    order = torch.argsort(counts, stable=True)
    starts = crow[:-1].long()[order]
    new_counts = counts[order]
    new_crow = torch.zeros_like(crow)
    new_crow[1:] = new_counts.cumsum(0).to(crow.dtype)
    # link k of stored row r comes from starts[r] + (k - new_crow[r])
    within = torch.arange(int(new_counts.sum())) - torch.repeat_interleave(new_crow[:-1].long(), new_counts)
    index = torch.repeat_interleave(starts, new_counts) + within
    return new_crow, col[index].contiguous(), values[index].contiguous(), order.to(torch.int32)


def torch_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int],
              device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    """S (out, in) as a `torch.sparse_csr_tensor` for `spmm_cuda`: crow (out+1,) and col (nnz,) of any
    integer dtype become int32 (cuSPARSE takes int32 or int64 indices, both alike; packed columns
    may be int16), values (nnz,) the compute dtype."""
    if crow.numel() - 1 != size[0]:
        raise ValueError(f"torch_csr: {crow.numel() - 1} row pointers for {size[0]} rows")
    return _csr_tensor(crow.to(device, torch.int32), col.to(device, torch.int32), values.to(device, dtype), size[1])


def spmm_cuda(x: torch.Tensor, csr: torch.Tensor) -> torch.Tensor:
    """`S X` on CUDA with cuSPARSE: x (in, T), csr a (out, in) `torch.sparse_csr_tensor` -> (out, T)."""
    return csr @ x


def dense_gemv(weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> bool:
    """out (T, n_out) = x (T, n_in) · weightᵀ for 1 ≤ T ≤ `GEMV_MAX_TOKENS` on CPU (`csrc/gemv.c`).

    weight: (n_out, n_in) contiguous fp32 or bf16; x: fp32 or bf16 (read as fp32); out: fp32 or bf16
    with contiguous rows. Sums in fp32. Returns False (nothing written) where the compiled kernel
    does not apply: another device, more tokens, other dtypes, no compiler; callers then use torch.
    """
    n_tok = x.shape[0]
    if not (1 <= n_tok <= GEMV_MAX_TOKENS and weight.device.type == x.device.type == out.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous()
            and x.dtype in (torch.float32, torch.bfloat16) and out.dtype in (torch.float32, torch.bfloat16)
            and out.shape == (n_tok, weight.shape[0]) and out.stride(1) == 1):
        return False
    lib, _ = _library()
    if lib is None:
        return False
    x = x.float().contiguous()
    y = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32)
    fn = lib.gemv_f32 if weight.dtype == torch.float32 else lib.gemv_bf16
    if fn(weight.data_ptr(), weight.shape[0], weight.shape[1], x.data_ptr(), x.stride(0), n_tok, y.data_ptr(),
          y.stride(0), torch.get_num_threads()):
        return False
    if y is not out:
        out.copy_(y)
    return True


LOWRANK_ACTIVATIONS = {"silu": 0, "relu": 1, "gelu": 2, "identity": 3}  # csrc/gemv.c's `act` codes


def lowrank_fm(lora_a: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, shapes: torch.Tensor, scale: float,
               activation: str, y: torch.Tensor) -> bool:
    """y (Σ out_m, T) += scale · B_m act(A_m x) for every member m of a fused group, T ≤ `GEMV_MAX_TOKENS`.

    lora_a: (Σ r_m, in) the members' A stacked; x: (in, T) feature-major, any strides; lora_b:
    (Σ out_m·r_m,) the members' B blocks (out_m × r_m) flattened one after the other; shapes: int32
    (2, members) of out_m and r_m; y: (Σ out_m, T) with contiguous rows. CPU, all four float32 or all
    bfloat16 (sums and the hidden activations in fp32) (`csrc/gemv.c`); returns False, nothing
    written, where it does not apply (the caller uses torch).
    """
    n_tok = x.shape[1]
    if not (1 <= n_tok <= GEMV_MAX_TOKENS and x.dtype == lora_a.dtype == lora_b.dtype == y.dtype
            and x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu" and y.stride(1) == 1
            and activation in LOWRANK_ACTIVATIONS):
        return False
    lib, _ = _library()
    if lib is None:
        return False
    n_rank, n_in = lora_a.shape
    scratch = torch.empty(n_tok * (n_in + n_rank), dtype=torch.float32)
    fn = lib.lowrank_fm if x.dtype == torch.float32 else lib.lowrank_fm_bf16
    return not fn(lora_a.data_ptr(), n_rank, n_in, x.data_ptr(), x.stride(0), x.stride(1), n_tok,
                  lora_b.data_ptr(), shapes[0].data_ptr(), shapes[1].data_ptr(), shapes.shape[1],
                  scale, LOWRANK_ACTIVATIONS[activation], y.data_ptr(), y.stride(0),
                  scratch.data_ptr(), torch.get_num_threads())


class GroupDecoder:
    """A fused group's `S x + scale · B act(A x)` for 1 … `GEMV_MAX_TOKENS` CPU tokens (decoding), fp32
    or bf16 (the group's dtype), the C calls' constant arguments bound once.

    At one token the kernels take ~50 µs per group at llama60m; the checks, pointer look-ups and
    tensor indexing of `spmm_cpu` / `lowrank_fm` added ~40 µs more. Same kernels, same results.
    crow/col/values/rows: the group's sorted CSR (None: no sparse kernel, the caller computes the
    base part); lora_a/lora_b/shapes: as `lowrank_fm` takes them (None: no low-rank branch).
    """

    def __init__(self, lib: ctypes.CDLL, n_in: int, n_out: int, csr: tuple[torch.Tensor, ...] | None,
                 lowrank: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, scale: float,
                 activation: str) -> None:
        self.lib, self.n_in, self.n_out = lib, n_in, n_out
        self.csr = csr  # kept: the pointers below must stay valid
        if csr is not None:
            crow, col, values, rows = csr
            if values.dtype == torch.float32:
                self.spmm = lib.spmm_i16 if col.dtype == torch.int16 else lib.spmm_i32
            else:
                self.spmm = lib.spmm_bf16_i16 if col.dtype == torch.int16 else lib.spmm_bf16_i32
            self.csr_ptrs = (crow.data_ptr(), col.data_ptr(), values.data_ptr(), rows.data_ptr())
        self.lowrank = lowrank
        if lowrank is not None:
            lora_a, lora_b, shapes = lowrank
            self.lowrank_fn = lib.lowrank_fm if lora_a.dtype == torch.float32 else lib.lowrank_fm_bf16
            self.n_rank = lora_a.shape[0]
            shapes = shapes.contiguous()
            self.lowrank = (lora_a, lora_b, shapes)
            self.scratch = torch.empty(GEMV_MAX_TOKENS * (n_in + self.n_rank), dtype=torch.float32)
            self.lowrank_args = (lora_a.data_ptr(), self.n_rank, n_in)
            self.lowrank_tail = (lora_b.data_ptr(), shapes.data_ptr(), shapes.data_ptr() + 4 * shapes.shape[1],
                                 shapes.shape[1], scale, LOWRANK_ACTIVATIONS[activation])

    def sparse(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y (out, T) = S x (in, T); both with contiguous rows."""
        threads, n_tok = torch.get_num_threads(), x.shape[1]
        tile = token_tile(self.n_in, n_tok)  # 0 (gather) below GATHER_BELOW tokens, else one 16-token tile
        if self.spmm(x.data_ptr(), x.stride(0), self.n_in, n_tok, *self.csr_ptrs,
                     y.data_ptr(), y.stride(0), self.n_out, tile, CHUNKS_PER_THREAD * threads, threads):
            raise MemoryError("GroupDecoder: could not allocate the kernel's buffers")

    def add_lowrank(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y (out, T) += scale · B act(A x) for every member; x (in, T), y with contiguous rows."""
        self.lowrank_fn(*self.lowrank_args, x.data_ptr(), x.stride(0), x.stride(1), x.shape[1], *self.lowrank_tail,
                        y.data_ptr(), y.stride(0), self.scratch.data_ptr(), torch.get_num_threads())


class _DecGroup(ctypes.Structure):
    """csrc/decode.c's `dec_group`: one fused group's kernel arguments (NULL crow / lora_a: part absent)."""
    _fields_ = [("n_in", ctypes.c_int), ("n_out", ctypes.c_int), ("crow", ctypes.c_void_p),
                ("col", ctypes.c_void_p), ("values", ctypes.c_void_p), ("rows", ctypes.c_void_p),
                ("col_i32", ctypes.c_int), ("lora_a", ctypes.c_void_p), ("lora_b", ctypes.c_void_p),
                ("outs", ctypes.c_void_p), ("ranks", ctypes.c_void_p), ("n_rank", ctypes.c_int),
                ("n_members", ctypes.c_int), ("scale", ctypes.c_float), ("act", ctypes.c_int)]


class _DecLayer(ctypes.Structure):
    """csrc/decode.c's `dec_layer`: a block's two norm weights and its four groups."""
    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("group", _DecGroup * 4)]


class DecodeLayers:
    """Every decoder block of a decoding step in one C call (`decode_layers` in `csrc/decode.c`): the
    kernels `feature_major.forward`'s loop calls one by one, in its order, for ≤ `GEMV_MAX_TOKENS`
    CPU tokens in fp32 or bf16. At llama1b the loop's ~14 Python calls per block cost 1/6 of a token.

    blocks: per block (input norm weight, post-attention norm weight, the `GroupDecoder`s of its
    (q, k, v), o, (gate, up) and down groups); every group's base is sparse or absent (not a dense
    weight), and the MLP's activation is SiLU. The tensors behind the pointers are kept referenced.
    """

    def __init__(self, lib: ctypes.CDLL, blocks: list[tuple[torch.Tensor, torch.Tensor, list[GroupDecoder]]],
                 eps: float, ffn: int, dtype: torch.dtype) -> None:
        self.fn = getattr(lib, "decode_layers" + ("" if dtype == torch.float32 else "_bf16"))
        self.blocks, self.eps, self.ffn, self.dtype = blocks, eps, ffn, dtype
        self.table = (_DecLayer * len(blocks))()
        widest = 0
        for entry, (norm1, norm2, groups) in zip(self.table, blocks, strict=True):
            entry.norm1, entry.norm2 = norm1.data_ptr(), norm2.data_ptr()
            for slot, dec in zip(entry.group, groups, strict=True):
                slot.n_in, slot.n_out = dec.n_in, dec.n_out
                if dec.csr is not None:
                    slot.crow, slot.col, slot.values, slot.rows = dec.csr_ptrs
                    slot.col_i32 = int(dec.csr[1].dtype == torch.int32)
                if dec.lowrank is not None:
                    slot.lora_a, slot.n_rank = dec.lowrank_args[0], dec.n_rank
                    slot.lora_b, slot.outs, slot.ranks, slot.n_members, slot.scale, slot.act = dec.lowrank_tail
                    widest = max(widest, dec.n_in + dec.n_rank)
                else:
                    widest = max(widest, dec.n_in)
        self.scratch = torch.empty(GEMV_MAX_TOKENS * widest, dtype=torch.float32)
        self.work: torch.Tensor | None = None

    def __call__(self, h: torch.Tensor, key: list[torch.Tensor], value: list[torch.Tensor], cos: torch.Tensor,
                 sin: torch.Tensor, start: int, batch: int, seq: int, n_heads: int, scale: float) -> None:
        """h (hidden, batch·seq) contiguous, updated in place through every block; key/value: each block's
        (batch, kv_heads, capacity, head_dim) cache, cos/sin its RoPE tables (see `attention_decode`)."""
        hidden, n_tok = h.shape
        _, n_kv, capacity, head_dim = key[0].shape
        q_rows = n_heads * head_dim
        size = n_tok * (2 * hidden + 2 * q_rows + 2 * n_kv * head_dim + 2 * self.ffn)
        if self.work is None or self.work.numel() < size:
            self.work = torch.empty(size, dtype=self.dtype)
        keys = (ctypes.c_void_p * len(key))(*[k.data_ptr() for k in key])
        values = (ctypes.c_void_p * len(value))(*[v.data_ptr() for v in value])
        threads = torch.get_num_threads()
        tile = token_tile(hidden, n_tok)  # ≤ GEMV_MAX_TOKENS tokens: the same for every group's n_in
        if self.fn(h.data_ptr(), hidden, batch, seq, ctypes.addressof(self.table), len(self.blocks),
                   ctypes.addressof(keys), ctypes.addressof(values), self.eps,
                   n_heads, n_kv, head_dim, cos.data_ptr(), sin.data_ptr(), capacity, start, scale,
                   tile, DECODE_ITEM_BYTES, self.work.data_ptr(), self.scratch.data_ptr(), threads):
            raise MemoryError("DecodeLayers: could not allocate the kernels' buffers")


def decode_kernels(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> ctypes.CDLL | None:
    """The compiled library for the decode-step kernels if the tensors are on CPU, all of one dtype
    among `dtypes`, and it could be built, else None (the caller uses torch)."""
    if len({t.dtype for t in tensors}) != 1:
        return None
    return _use_compiled(*tensors, dtypes=dtypes)


def _suffix(t: torch.Tensor) -> str:
    """The name suffix of a kernel's variant for t's dtype: "" (float32) or "_bf16"."""
    return "" if t.dtype == torch.float32 else "_bf16"


def rms_norm_fm(lib: ctypes.CDLL, h: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm, feature-major: h (H, T) -> out (H, T) with contiguous rows; weight (H,) contiguous.
    All three float32 or all bfloat16 (fp32 arithmetic)."""
    h = _rows_contiguous(h)
    fn = getattr(lib, "rms_norm_fm" + _suffix(h))
    fn(h.data_ptr(), h.stride(0), h.shape[0], h.shape[1], weight.data_ptr(), eps, out.data_ptr(), out.stride(0))
    return out


def silu_mul_fm(lib: ctypes.CDLL, gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """gate_up (2·ffn, T) float32 or bfloat16, contiguous rows: rows [0, ffn) become act(gate) · up in
    place; returns that view."""
    ffn = gate_up.shape[0] // 2
    fn = getattr(lib, "silu_mul_fm" + _suffix(gate_up))
    fn(gate_up.data_ptr(), gate_up.stride(0), ffn, gate_up.shape[1], LOWRANK_ACTIVATIONS[activation])
    return gate_up[:ffn]


def attention_decode(lib: ctypes.CDLL, qkv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, start: int, seq: int, n_heads: int, scale: float,
                     out: torch.Tensor) -> torch.Tensor:
    """RoPE, KV-cache write and attention for batch × seq new tokens at positions start … (`csrc/decode.c`).

    qkv: (q_rows + 2·kv_rows, batch·seq) feature-major with contiguous rows; key/value: one block's
    contiguous (batch, kv_heads, capacity, head_dim) cache, written at [start, start + seq); cos/sin:
    (head_dim, 1, capacity) contiguous; out: (n_heads·head_dim, batch·seq), contiguous rows. All float32
    or all bfloat16 (fp32 arithmetic).
    """
    batch, n_kv, capacity, head_dim = key.shape
    fn = getattr(lib, "attn_decode" + _suffix(qkv))
    if fn(qkv.data_ptr(), qkv.stride(0), batch, seq, n_heads, n_kv, head_dim, cos.data_ptr(), sin.data_ptr(),
          key.data_ptr(), value.data_ptr(), capacity, start, scale, out.data_ptr(), out.stride(0),
          torch.get_num_threads()):
        raise MemoryError("attention_decode: could not allocate the score buffers")
    return out


# --- Training kernels (token-major, differentiable through chtsl_infer.model.csr.csr_linear) ---------------

def _csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
    """A `torch.sparse_csr_tensor` view of a CSR triple (int32 indices are kept: cuSPARSE's own type)."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=(crow.numel() - 1, n_cols), check_invariants=False)


def csr_mm_torch(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                 n_rows: int) -> torch.Tensor:
    """`x Aᵀ` with torch's sparse CSR matmul (cuSPARSE on CUDA, MKL on CPU): x (N, K) -> (N, n_rows)."""
    n_tok, n_cols = x.shape
    if n_tok == 0 or n_rows == 0 or col.numel() == 0:
        return torch.zeros(n_tok, n_rows, dtype=x.dtype, device=x.device)
    a = _csr_tensor(crow, col, values, n_cols)
    return (a @ x.t()).t().contiguous()


def csr_sddmm_torch(dy: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                    n_cols: int) -> torch.Tensor:
    """`(dyᵀ x)` at the CSR's positions with `torch.sparse.sampled_addmm`: dy (N, R), x (N, K) -> (nnz,)."""
    nnz = col.numel()
    if nnz == 0 or dy.shape[0] == 0:
        return torch.zeros(nnz, dtype=dy.dtype, device=dy.device)
    pattern = _csr_tensor(crow, col, torch.zeros(nnz, dtype=dy.dtype, device=dy.device), n_cols)
    return torch.sparse.sampled_addmm(pattern, dy.t().contiguous(), x.contiguous(), beta=0.0).values()


def train_tile(n_tok: int) -> int:
    """Tokens per feature-major tile of the training kernels: 16, 32 or 64 (the smallest covering n_tok, at most 64)."""
    return 16 if n_tok <= 16 else 32 if n_tok <= 32 else MM_TILE


def sddmm_tile(n_tok: int, n_cols: int) -> int:
    """Tokens per tile of csr_sddmm_tm: 16 or 32 for short inputs, SDDMM_TILE while (n_cols × tile) fp32 fits
    SDDMM_TILE_BYTES, else 32."""
    if n_tok <= 16:
        return 16
    if n_tok <= 32 or n_cols * SDDMM_TILE * 4 > SDDMM_TILE_BYTES:
        return 32
    return SDDMM_TILE


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` (2-D) itself if its rows are contiguous (what the C kernels read), else a contiguous copy."""
    return t if t.stride(1) == 1 and t.stride(0) >= t.shape[1] else t.contiguous()


def _use_compiled(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> ctypes.CDLL | None:
    """The compiled library if every operand is a CPU tensor of one of `dtypes` (float32) and it could be
    built, else None."""
    if not all(t.device.type == "cpu" and t.dtype in dtypes for t in tensors):
        return None
    return _library()[0]


def csr_mm(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
           n_rows: int) -> torch.Tensor:
    """`y = x Aᵀ`, token-major: x (N, K), A (n_rows × K) a CSR triple (int32 indices) -> y (N, n_rows).

    Used as `y = x Sᵀ` (forward) and, on the transposed structure, `dx = dy S` (backward).
    CPU float32: the compiled `csr_mm_tm` (`csrc/csr_train.c`); otherwise (CUDA, float64, no
    compiler) torch's sparse CSR matmul.
    """
    lib = _use_compiled(x, values)
    if lib is None:
        return csr_mm_torch(x, crow, col, values, n_rows)
    n_tok, n_cols = x.shape
    y = torch.empty(n_tok, n_rows, dtype=torch.float32)
    if n_tok == 0 or n_rows == 0 or col.numel() == 0:
        return y.zero_()
    x = _rows_contiguous(x)
    threads = torch.get_num_threads()
    tile = train_tile(n_tok)
    n_tiles = -(-n_tok // tile)
    n_chunks = max(1, -(-CHUNKS_PER_THREAD * threads // n_tiles)) if n_tiles < threads else 1  # few tokens: split rows
    crow, col, values = crow.contiguous(), col.contiguous(), values.contiguous()
    if lib.csr_mm_tm(x.data_ptr(), x.stride(0), n_tok, n_cols, crow.data_ptr(), col.data_ptr(), values.data_ptr(),
                     n_rows, y.data_ptr(), y.stride(0), tile, n_chunks, threads):
        raise MemoryError("csr_mm: could not allocate the kernel's tile buffers")
    return y


def csr_sddmm(dy: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, n_cols: int) -> torch.Tensor:
    """SDDMM, token-major: out[k] = Σ_n dy[n, row_k] · x[n, col_k] over the CSR's links -> (nnz,).

    dy (N, n_rows), x (N, n_cols): the gradient of `x Sᵀ` with respect to S's values.
    CPU float32: the compiled `csr_sddmm_tm`; otherwise `torch.sparse.sampled_addmm`.
    """
    lib = _use_compiled(dy, x)
    if lib is None:
        return csr_sddmm_torch(dy, x, crow, col, n_cols)
    n_tok, n_rows = dy.shape
    out = torch.empty(col.numel(), dtype=torch.float32)
    dy, x = _rows_contiguous(dy), _rows_contiguous(x)
    crow, col = crow.contiguous(), col.contiguous()
    if lib.csr_sddmm_tm(dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), n_tok, n_rows, n_cols,
                        crow.data_ptr(), col.data_ptr(), out.data_ptr(), sddmm_tile(n_tok, n_cols),
                        torch.get_num_threads()):
        raise MemoryError("csr_sddmm: could not allocate the kernel's tile buffers")
    return out


def csr_transpose(crow: torch.Tensor, col: torch.Tensor,
                  n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The transposed pattern of a valid int32 CSR (n_rows × n_cols): (t_crow (n_cols+1,), t_row, t_perm (nnz,)).

    Column j's entries are t_crow[j] .. t_crow[j+1]-1 with rows t_row ascending; t_perm[e] is the value
    index of transposed entry e. int32 throughout. CPU: the compiled counting sort; else a stable argsort.
    """
    n_rows, nnz = crow.numel() - 1, col.numel()
    lib = _library()[0] if crow.device.type == "cpu" else None
    if lib is not None and crow.dtype == torch.int32 and col.dtype == torch.int32:
        crow, col = crow.contiguous(), col.contiguous()
        t_crow = torch.empty(n_cols + 1, dtype=torch.int32)
        t_row, t_perm = torch.empty(nnz, dtype=torch.int32), torch.empty(nnz, dtype=torch.int32)
        if lib.csr_transpose(crow.data_ptr(), col.data_ptr(), n_rows, n_cols, t_crow.data_ptr(), t_row.data_ptr(),
                             t_perm.data_ptr()) == 0:
            return t_crow, t_row, t_perm
    rows = torch.repeat_interleave(torch.arange(n_rows, dtype=torch.int32, device=crow.device),
                                   (crow[1:] - crow[:-1]).long())
    perm = torch.argsort(col, stable=True)  # entries are sorted by (row, col): a stable sort by col gives (col, row)
    t_crow = torch.zeros(n_cols + 1, dtype=torch.int64, device=crow.device)
    torch.cumsum(torch.bincount(col.long(), minlength=n_cols), 0, out=t_crow[1:])
    return t_crow.to(torch.int32), rows[perm].contiguous(), perm.to(torch.int32)
