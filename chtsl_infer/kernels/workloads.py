"""The representative calls the tuner times (`tune.py`): each a kernel operation on synthetic data.

Small synthetic CSR layers at the presets' density (5 %: s_total 0.9), with the input widths of
llama60m and llama1b layers (512 and 1376; 2048 and 5461) but few rows, so one call takes about a
millisecond:

    spmm forward   256 tokens (token tiles of 32 or 64, `tile_bytes`), inputs 512 … 5461 wide
    spmm tile      64 tokens: one tile, the rows split instead (`chunks_per_thread`)
    spmm batch     2, 3, 4 tokens: gather loop or a 16-token tile (`gather_below`)
    spmm decode    1 token (row chunks); int8 and bf16 values at 1 token with S as delta8 exports
                   store it (the gather loops, which build variant `g8` changes; `widen_deltas`)
    decode step    every block of a decoding step in one call (`DecodeLayers`, 1 token at position
                   128): llama60m's 8 blocks (in cache) and llama1b blocks, as many as read 1.5×
                   the last-level cache, ≤ 4 (streamed from memory, as a 1B model is)
    attention      llama60m's 8 heads over 64 and 512 cached positions, in cache; llama1b's 32 heads
                   over 128, from memory (`attn_min_work`)
    csr_mm         512 tokens, inputs 512 and 2048 (`mm_tile`)
    csr_sddmm      512 tokens, 512 … 5461 columns (`sddmm_tile`, `sddmm_tile_bytes`)

Each `Workload` knows what the settings decide for its call (`choice`): two settings with equal
choices run the same code, so the tuner times only the workloads a candidate changes. Data comes from
a private generator (the process's random state is left alone).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chtsl_infer.kernels import build
from chtsl_infer.kernels.decode import DecodeLayers, GroupDecoder, attention_decode
from chtsl_infer.kernels.settings import KernelSettings, settings
from chtsl_infer.kernels.sparse import spmm_cpu
from chtsl_infer.kernels.training import csr_mm, csr_sddmm

DENSITY = 0.05  # the presets' S density at s_total 0.9
HEAD_DIM = 64  # every preset's
LLAMA60M = {"hidden": 512, "ffn": 1376, "heads": 8, "rank": 16}  # llama60m-c4 at s_total 0.9
LLAMA1B = {"hidden": 2048, "ffn": 5461, "heads": 32, "rank": 65}  # llama1b-c4 at s_total 0.9


@dataclass
class Workload:
    """One timed call: `run()` calls the operation once; `choice(settings)` is what the settings decide
    for it (tile widths, chunks, work items, a thread split: equal choices = the same code and work);
    `paths(settings)`: the compile-time code paths it runs that build variants change ("tile": the
    spmm token-tile loops, `vw8`; "gather16": the int8/bf16 gather loops, `g8`)."""

    name: str
    run: Callable[[], object]
    choice: Callable[[KernelSettings], tuple]
    paths: Callable[[KernelSettings], frozenset[str]] = field(default=lambda s: frozenset())


def spmm_paths(tile: int, dtype: torch.dtype) -> frozenset[str]:
    """The variant-dependent paths of an spmm call with token tile `tile` (0: the gather loop) and
    values of `dtype`: the tile loops, or the gather loop that vgatherdps serves (int8, bf16)."""
    if tile:
        return frozenset({"tile"})
    return frozenset({"gather16"}) if dtype in (torch.int8, torch.bfloat16) else frozenset()


def last_level_cache_bytes() -> int:
    """The CPU's largest cache in bytes (sysfs), 32 MiB where the OS does not say."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        if text.rstrip("KMG").isdigit():
            sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 << 20)


def random_csr(rows: int, n_in: int, gen: torch.Generator, col_dtype: torch.dtype | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow int32, col, values) of a rows × n_in CSR with k = DENSITY · n_in links per row, link j of a
    row at a random column of the j-th of k equal stretches of the input: sorted, distinct, spread like
    a uniform random support, and made without a sort (a 1B block's 2.5 M links in a few ms). Rows of
    equal length are already in `sort_rows`' order (rows = identity). col int16 where n_in fits, as
    the runtime stores it; values all 0.02 (`_filled`; 0 as int8), fp32 or `dtype`."""
    per_row = max(1, round(DENSITY * n_in))
    stretch = n_in // per_row
    col = (torch.arange(per_row) * n_in // per_row + torch.randint(0, stretch, (rows, per_row), generator=gen))
    col = col.reshape(-1)
    col_dtype = col_dtype or (torch.int16 if n_in <= 32767 else torch.int32)
    crow = torch.arange(0, (rows + 1) * per_row, per_row, dtype=torch.int32)
    return crow, col.to(col_dtype), _filled(rows * per_row, dtype=dtype)


def _filled(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor of 0.02s: the kernels' time does not depend on the values (no denormals, no NaN), and
    filling is ~50× faster than drawing random numbers (a 1B block has 7 M weights)."""
    return torch.full(shape, 0.02, dtype=dtype)


def spmm_choice(s: KernelSettings, n_in: int, n_tok: int, threads: int) -> tuple[int, int]:
    """(token tile, row chunks) of `spmm_cpu` for n_tok tokens of n_in features, as it computes them."""
    tile = s.token_tile(n_in, n_tok)
    return tile, s.row_chunks(1 if tile == 0 else -(-n_tok // tile), threads)


def _spmm(name: str, rows: int, n_in: int, n_tok: int, gen: torch.Generator, threads: int,
          dtype: torch.dtype = torch.float32, deltas: bool = False) -> Workload:
    """rows × n_in at DENSITY times n_tok tokens; int8 values (with row scales) take fp32 activations.
    `deltas`: S as a delta8 export stores it, held as `KernelSettings.widen_deltas` says (8-bit deltas
    as read, or absolute int16 columns)."""
    from chtsl_infer.formats.encoding import delta_encode  # it imports chtsl_infer.kernels: not at module level

    crow, col, values = random_csr(rows, n_in, gen, dtype=dtype)
    held = {1: (crow, col, values), 0: delta_encode(crow, col, values) if deltas else (crow, col, values)}
    scale = torch.full((rows,), 0.01) if dtype == torch.int8 else None
    act = torch.float32 if dtype == torch.int8 else dtype
    x = torch.randn(n_in, n_tok, generator=gen).to(act)
    out = torch.empty(rows, n_tok, dtype=act)

    def run() -> None:
        spmm_cpu(x, *held[settings().widen_deltas], out=out, scale=scale)

    return Workload(name, run, lambda s: (*spmm_choice(s, n_in, n_tok, threads), deltas and s.widen_deltas),
                    lambda s: spmm_paths(s.token_tile(n_in, n_tok), dtype))


def _decode(name: str, shape: dict[str, int], blocks: int, gen: torch.Generator) -> Workload:
    """One decoding step (1 token at position 128) through `blocks` synthetic blocks of `shape`."""
    hidden, ffn, heads, rank = shape["hidden"], shape["ffn"], shape["heads"], shape["rank"]
    start, capacity = 128, 256

    def group(n_in: int, n_out: int) -> GroupDecoder:
        crow, col, values = random_csr(n_out, n_in, gen)
        lora_a, lora_b = _filled(rank, n_in), _filled(n_out * rank)
        shapes = torch.tensor([[n_out], [rank]], dtype=torch.int32)
        rows = torch.arange(n_out, dtype=torch.int32)  # equal-length rows: sort_rows' order already
        return GroupDecoder(n_in, n_out, (crow, col, values, rows, None), (lora_a, lora_b, shapes, None, None), 1.0,
                            "silu")

    spec = [(torch.ones(hidden), torch.ones(hidden),
             [group(hidden, 3 * hidden), group(hidden, hidden), group(hidden, 2 * ffn), group(ffn, hidden)])
            for _ in range(blocks)]
    key = [_filled(1, heads, capacity, HEAD_DIM) for _ in range(blocks)]
    value = [_filled(1, heads, capacity, HEAD_DIM) for _ in range(blocks)]
    angle = torch.arange(capacity).float()[None, None, :] * torch.linspace(0.01, 1.0, HEAD_DIM)[:, None, None]
    cos, sin = angle.cos().contiguous(), angle.sin().contiguous()
    h0 = torch.randn(hidden, 1, generator=gen)
    h = h0.clone()
    per_library: dict[Path, DecodeLayers] = {}  # DecodeLayers binds the build in force when made

    def run() -> None:
        lib = build.current()
        assert lib is not None
        if lib.path not in per_library:
            per_library[lib.path] = DecodeLayers(spec, 1e-5, ffn, torch.float32)
        h.copy_(h0)  # the blocks update h in place: the same input every call
        per_library[lib.path](h, key, value, cos, sin, start, 1, 1, heads, HEAD_DIM ** -0.5)

    attn_work = heads * (start + 1) * HEAD_DIM
    return Workload(name, run, lambda s: (s.token_tile(hidden, 1), s.decode_item_bytes, attn_work >= s.attn_min_work),
                    lambda s: spmm_paths(s.token_tile(hidden, 1), torch.float32))


def _attention(name: str, heads: int, positions: int, gen: torch.Generator, layers: int = 1) -> Workload:
    """One token attending over `positions` cached ones with `heads` heads; `layers` caches taken in
    turn, one a call: as many as exceed the last-level cache make each call read its keys and values
    from memory, as decoding does once a token's weights have streamed through the caches."""
    capacity = positions + 1
    qkv = torch.randn(3 * heads * HEAD_DIM, 1, generator=gen)
    caches = [(_filled(1, heads, capacity, HEAD_DIM), _filled(1, heads, capacity, HEAD_DIM)) for _ in range(layers)]
    cos, sin = torch.ones(HEAD_DIM, 1, capacity), torch.zeros(HEAD_DIM, 1, capacity)
    out = torch.empty(heads * HEAD_DIM, 1)
    work = heads * capacity * HEAD_DIM
    turn = itertools.count()

    def run() -> None:
        key, value = caches[next(turn) % layers]
        attention_decode(qkv, key, value, cos, sin, positions, 1, heads, 0.125, out)

    return Workload(name, run, lambda s: (work >= s.attn_min_work,))


def _csr_mm(name: str, rows: int, n_in: int, n_tok: int, gen: torch.Generator, threads: int) -> Workload:
    crow, col, values = random_csr(rows, n_in, gen, col_dtype=torch.int32)
    x = torch.randn(n_tok, n_in, generator=gen)

    def choice(s: KernelSettings) -> tuple[int, int]:
        tile = s.train_tile(n_tok)
        return tile, s.row_chunks(-(-n_tok // tile), threads)

    return Workload(name, lambda: csr_mm(x, crow, col, values, rows), choice)


def _csr_sddmm(name: str, rows: int, n_cols: int, n_tok: int, gen: torch.Generator) -> Workload:
    crow, col, _ = random_csr(rows, n_cols, gen, col_dtype=torch.int32)
    dy, x = torch.randn(n_tok, rows, generator=gen), torch.randn(n_tok, n_cols, generator=gen)
    return Workload(name, lambda: csr_sddmm(dy, x, crow, col, n_cols), lambda s: (s.sddmm_tile_for(n_tok, n_cols),))


def workloads(threads: int, seed: int = 0) -> Iterator[Workload]:
    """The tuner's workloads for `threads` threads (see the module docstring), made one at a time, the
    cheapest to make first (the tuner stops making them when its budget says so)."""
    gen = torch.Generator().manual_seed(seed)
    small, big = LLAMA60M, LLAMA1B
    widths = (small["hidden"], small["ffn"], big["hidden"], big["ffn"])
    for n in widths:
        yield _spmm(f"spmm 256 tok, in {n}", 512, n, 256, gen, threads)
    yield _spmm("spmm 64 tok, in 2048", 512, 2048, 64, gen, threads)
    yield _spmm("spmm 64 tok bf16, in 1376", 512, 1376, 64, gen, threads, torch.bfloat16)
    for n in (2, 3, 4):
        yield _spmm(f"spmm {n} tok, in 2048", 1024, 2048, n, gen, threads)
    yield _spmm("spmm 1 tok, in 2048", 2048, 2048, 1, gen, threads)
    yield _spmm("spmm 1 tok int8 delta8, in 5461", 2048, 5461, 1, gen, threads, torch.int8, deltas=True)
    yield _spmm("spmm 1 tok bf16 delta8, in 2048", 2048, 2048, 1, gen, threads, torch.bfloat16, deltas=True)
    yield _attention("attention 8 heads, 64 pos", LLAMA60M["heads"], 63, gen)
    yield _attention("attention 8 heads, 512 pos", LLAMA60M["heads"], 511, gen)
    kv_bytes = 2 * 4 * big["heads"] * 129 * HEAD_DIM  # llama1b's keys and values at 128 positions
    yield _attention("attention 32 heads, 128 pos, from memory", big["heads"], 128, gen,
                     math.ceil(1.5 * last_level_cache_bytes() / kv_bytes))
    for n in (small["hidden"], big["hidden"]):
        yield _csr_mm(f"csr_mm 512 tok, in {n}", 512, n, 512, gen, threads)
    for n in widths:
        yield _csr_sddmm(f"csr_sddmm 512 tok, cols {n}", 256, n, 512, gen)
    yield _decode("decode llama60m × 8", small, 8, gen)
    hidden, ffn = big["hidden"], big["ffn"]
    block_bytes = (DENSITY * 6 * (4 * hidden ** 2 + 3 * hidden * ffn)  # S: fp32 values + int16 columns
                   + 4 * big["rank"] * (3 * hidden + ffn + 6 * hidden + 2 * ffn))  # fp32 A and B
    blocks = min(4, max(1, math.ceil(1.5 * last_level_cache_bytes() / block_bytes)))
    yield _decode(f"decode llama1b × {blocks}", big, blocks, gen)
