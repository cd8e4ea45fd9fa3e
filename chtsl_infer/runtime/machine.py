"""What the machine under a benchmark can do, measured in the run: the CPU's name and relevant flags,
its last-level cache, its streaming read bandwidth (the limit of memory-bound decoding), a dense
GEMM's rate (the limit of a full forward), and which dense path multiplies a few decoding tokens
faster (`backends.dense_fm`: torch's GEMV or the project's).

`chtsl bench` runs these in a worker process of its own before its configurations (same threads,
nothing else resident), so each number of a run is held against limits measured in that run.
Every rate is the best of a few repetitions (as STREAM reports): the machine can do at least that.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from chtsl_infer import kernels
from chtsl_infer.runtime.backends import DENSE_PATHS, dense_fm

# /proc/cpuinfo flags that decide what the kernels' vectors are (x86: "flags"; arm64: "Features").
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm")
STREAM_MIN_BYTES = 256 << 20  # the read buffer: 4 × the last-level cache, at least this much
GEMV_ROW = 4096  # floats per row when the project's GEMV streams the buffer as a matrix


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    """The CPU's name: /proc/cpuinfo's "model name" (x86) or "Hardware"/"CPU part" (arm), else what
    `platform` knows."""
    fields = {}
    for line in _cpuinfo():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    for key in ("model name", "Hardware", "CPU part"):
        if fields.get(key):
            return fields[key]
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    """The host's instruction-set flags among `ISA_FLAGS` (what `-march=native` builds the kernels for)."""
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):
            present = set(line.partition(":")[2].split())
            return [f for f in ISA_FLAGS if f in present]
    return []


def _size(text: str) -> int:
    """sysfs cache sizes: "32768K", "1M", "512"."""
    text = text.strip()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text.rstrip("KkMmGg")) * scale


def llc_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Bytes of CPU 0's last-level (highest level, data or unified) cache from sysfs; None where unknown."""
    best: tuple[int, int] | None = None
    for index in root.glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level, size = int((index / "level").read_text()), _size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if best is None or level > best[0]:
            best = (level, size)
    return None if best is None else best[1]


def stream_bytes(llc: int | None) -> int:
    """The read buffer's size: 4 × the last-level cache, at least `STREAM_MIN_BYTES`, whole GEMV rows."""
    size = max(4 * (llc or 0), STREAM_MIN_BYTES)
    row = GEMV_ROW * 4
    return -(-size // row) * row


def stream_read(nbytes: int, repeats: int = 5) -> dict[str, float]:
    """GB/s (10⁹ bytes/s) reading an fp32 buffer of `nbytes` with all of torch's threads, per reader,
    best of `repeats` after one untimed pass (the readers interleaved, so load hits them alike):
    "torch_sum" (`Tensor.sum`) and, with the compiled kernels, "gemv" (the project's GEMV streaming the
    buffer as an (n, 4096) matrix times one vector: what decoding's dense reads run on)."""
    buf = torch.full((nbytes // (4 * GEMV_ROW), GEMV_ROW), 1e-3)  # written once: every page resident
    x = torch.ones(1, GEMV_ROW)
    y = torch.empty(1, buf.shape[0])
    readers = {"torch_sum": lambda: buf.sum()}
    if kernels.dense_gemv(buf, x, y):
        readers["gemv"] = lambda: kernels.dense_gemv(buf, x, y)
    best = dict.fromkeys(readers, float("inf"))
    for _ in range(repeats):
        for name, read in readers.items():
            start = time.perf_counter()
            read()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: buf.nbytes / t / 1e9 for name, t in best.items()}


def gemm_gflops(n_out: int, n_in: int, n_tok: int, dtype: torch.dtype = torch.float32, repeats: int = 3,
                min_seconds: float = 0.2) -> float:
    """GFLOP/s (2·n_out·n_in·n_tok per call) of torch's GEMM (n_out, n_in) · (n_in, n_tok): the best call
    of at least `repeats`, repeated until `min_seconds` have passed (small shapes: many calls), after
    one untimed call."""
    w = torch.full((n_out, n_in), 1e-3, dtype=dtype)
    x = torch.full((n_in, n_tok), 1e-3, dtype=dtype)
    out = torch.empty(n_out, n_tok, dtype=dtype)
    torch.mm(w, x, out=out)
    best, spent, calls = float("inf"), 0.0, 0
    while calls < repeats or (spent < min_seconds and calls < 10_000):
        start = time.perf_counter()
        torch.mm(w, x, out=out)
        took = time.perf_counter() - start
        best, spent, calls = min(best, took), spent + took, calls + 1
    return 2 * n_out * n_in * n_tok / best / 1e9


def dense_group_shapes(config) -> list[tuple[int, int]]:  # config: ChtslConfig
    """(n_out, n_in) of a block's four fused groups in the dense model of `config`'s shape: (q, k, v),
    o, (gate, up), down (`backends.GROUPS`)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q_rows, kv_rows = heads * head_dim, config.num_key_value_heads * head_dim
    ffn = config.intermediate_size
    return [(q_rows + 2 * kv_rows, hidden), (hidden, q_rows), (2 * ffn, hidden), (hidden, ffn)]


def dense_paths(n_tok: int, dtype: torch.dtype) -> tuple[str, ...]:
    """The paths of `DENSE_PATHS` that differ at n_tok CPU tokens of `dtype`: "gemv" only where
    `dense_fm` would take it (≤ `GEMV_MAX_TOKENS` tokens, fp32/bf16, the compiled kernels)."""
    gemv = (n_tok <= kernels.GEMV_MAX_TOKENS and dtype in (torch.float32, torch.bfloat16)
            and kernels.cpu_kernel_status()[0])
    return DENSE_PATHS if gemv else ("torch",)


def time_dense_paths(shapes: list[tuple[int, int]], n_tok: int, dtype: torch.dtype, blocks: int = 1,
                     repeats: int = 5) -> dict[str, float]:
    """Seconds per block for each path of `dense_paths` to multiply one weight of each (n_out, n_in)
    shape (a block's dense linears) by n_tok feature-major tokens through `dense_fm`. `blocks` copies of
    the weights are run in turn, as a model's blocks are, so that, as in decoding, they stream from
    memory rather than from a cache that one block fits in. The median over `repeats` of each path's
    total ÷ blocks, paths interleaved per repetition after one untimed round."""
    paths = dense_paths(n_tok, dtype)
    x = [torch.full((n_in, n_tok), 1e-3, dtype=dtype) for _, n_in in shapes]
    out = [torch.empty(n_out, n_tok, dtype=dtype) for n_out, _ in shapes]
    weights = [[torch.full(s, 1e-3, dtype=dtype) for s in shapes] for _ in range(blocks)]
    totals: dict[str, list[float]] = {p: [] for p in paths}
    for rep in range(repeats + 1):
        for path in paths:
            start = time.perf_counter()
            for block in weights:
                for w, xi, yi in zip(block, x, out, strict=True):
                    dense_fm(w, xi, yi, path)
            if rep:
                totals[path].append((time.perf_counter() - start) / blocks)
    return {p: statistics.median(t) for p, t in totals.items()}


def stream_blocks(shapes: list[tuple[int, int]], itemsize: int, n_blocks: int, llc: int | None) -> int:
    """How many copies of a block's dense weights `time_dense_paths` should cycle through: enough to
    exceed `stream_bytes(llc)` (so they stream from memory), at most the model's `n_blocks`."""
    block = itemsize * sum(n_out * n_in for n_out, n_in in shapes)
    return max(1, min(n_blocks, -(-stream_bytes(llc) // block)))


__all__ = ["cpu_flags", "cpu_model", "dense_group_shapes", "dense_paths", "gemm_gflops", "llc_bytes",
           "stream_blocks", "stream_bytes", "stream_read", "time_dense_paths"]
