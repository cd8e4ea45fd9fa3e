"""The kernels' runtime parameters: one frozen `KernelSettings`, read through `settings()`.

These are the choices a call makes at run time — token tile widths, cache budgets, how finely the
rows are split — as opposed to the compile-time choices listed in `table.py`. The defaults were
measured on one CPU (2 AMD EPYC cores, AVX2, 512 KiB L2); `install` replaces them for the whole
process (a tuner that measured better values on this machine), `override` for a block (tests, or
timing a candidate). Every value a field accepts yields the same results up to float summation
order; the tile widths must be ones the C kernels are specialised for (16, 32 or 64 tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

ZERO_OK = ("gather_below", "widen_deltas")  # the fields that may be 0
TILE_WIDTHS = (16, 32, 64)  # token tiles the C kernels are specialised for (ROWS16/32/64, MM_ROWS, SDDMM_ROWS)


@dataclass(frozen=True)
class KernelSettings:
    """Run-time parameters of the C kernels (bytes and tokens; defaults = the measured ones).

    tile_bytes: `spmm` takes 64-token tiles while their fp32 buffer (n_in × 64 × 4 bytes) fits in
        this much of L2, else 32.
    mm_tile: tokens per tile of `csr_mm_tm` (training forward and dx) beyond 32 tokens; 32 = 4 × 2 AVX2
        accumulators, measured best.
    sddmm_tile: tokens per tile of `csr_sddmm_tm` beyond 32 tokens, while its (n_cols × tile) fp32
        buffer fits `sddmm_tile_bytes` (half of a 512 KiB L2), else 32.
    gather_below: calls with fewer tokens take `spmm`'s per-token gather loop, others 16-token vector
        tiles (measured crossover: 2–4).
    chunks_per_thread: row chunks per thread when a call has fewer token tiles than threads (decoding).
    decode_item_bytes: `decode_layers` deals a group's sparse and A rows to the threads in work items
        of about this many bytes.
    attn_min_work: `attn_decode` splits its (sequence, head) pairs over the threads from this many
        multiply-adds (batch · heads · positions · head_dim · new tokens) on; below, one thread.
    widen_deltas: 1: a model read with 8-bit column deltas (packed format 2) is held with absolute
        int16/int32 columns (one more byte per link, no per-link prefix sum in the gather loops; the
        padding links go); 0: as read. Decided when a model is built (`runtime.fused`). Default 1:
        measured on AMD Zen 4 (AVX-512), where the deltas' prefix sum bounds the gather loops.
    """

    tile_bytes: int = 1 << 20
    mm_tile: int = 32
    sddmm_tile: int = 64
    sddmm_tile_bytes: int = 256 << 10
    gather_below: int = 3
    chunks_per_thread: int = 2
    decode_item_bytes: int = 64 << 10
    attn_min_work: int = 1 << 14
    widen_deltas: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if f.name in ZERO_OK else 1):
                raise ValueError(f"KernelSettings.{f.name} must be a positive integer, got {value!r}")
        if self.widen_deltas not in (0, 1):
            raise ValueError(f"KernelSettings.widen_deltas must be 0 or 1, got {self.widen_deltas!r}")
        for name in ("mm_tile", "sddmm_tile"):
            if getattr(self, name) not in TILE_WIDTHS:
                raise ValueError(f"KernelSettings.{name} must be one of {TILE_WIDTHS}, got {getattr(self, name)}")

    def token_tile(self, n_in: int, n_tok: int) -> int:
        """Tokens per task of `spmm` for n_tok tokens of n_in features; 0 = the per-token gather loop.

        The smallest of 16/32/64 covering n_tok (a short batch is not padded to 64), 64 only while
        its (n_in × 64) fp32 buffer fits in `tile_bytes`.
        """
        if n_tok < self.gather_below:
            return 0
        if n_tok <= 16:
            return 16
        return 32 if n_tok <= 32 or n_in * 64 * 4 > self.tile_bytes else 64

    def train_tile(self, n_tok: int) -> int:
        """Tokens per feature-major tile of `csr_mm_tm`: 16 or 32 (the smallest covering n_tok), else `mm_tile`."""
        return 16 if n_tok <= 16 else 32 if n_tok <= 32 else self.mm_tile

    def sddmm_tile_for(self, n_tok: int, n_cols: int) -> int:
        """Tokens per tile of `csr_sddmm_tm`: 16 or 32 for short inputs, `sddmm_tile` while (n_cols × tile)
        fp32 fits `sddmm_tile_bytes`, else 32."""
        if n_tok <= 16:
            return 16
        if n_tok <= 32 or n_cols * self.sddmm_tile * 4 > self.sddmm_tile_bytes:
            return 32
        return self.sddmm_tile

    def row_chunks(self, n_tiles: int, threads: int) -> int:
        """Row chunks per token tile: 1 while the tiles alone keep every thread busy, else enough for
        `chunks_per_thread` tasks per thread (few tokens: the rows are split instead)."""
        return max(1, -(-self.chunks_per_thread * threads // n_tiles)) if n_tiles < threads else 1


_current = KernelSettings()


def settings() -> KernelSettings:
    """The parameters in force (the defaults unless `install` or `override` replaced them)."""
    return _current


def install(new: KernelSettings) -> KernelSettings:
    """Puts `new` in force for the whole process; returns the settings it replaced."""
    global _current
    previous, _current = _current, new
    return previous


@contextmanager
def override(**changes: int) -> Iterator[KernelSettings]:
    """The current settings with `changes` (field=value) in force inside the block, restored after."""
    previous = install(replace(_current, **changes))
    try:
        yield _current
    finally:
        install(previous)
