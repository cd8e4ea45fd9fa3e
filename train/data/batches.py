"""Fixed-length token rows and the batches cut from them.

Documents become rows of `seq_len` token ids: GaLore-style (default) each document is
truncated/padded to `seq_len` and padded positions are ignored in the loss (label -100);
`packing` concatenates documents (each followed by EOS) and cuts the stream into full rows.

Batches are a pure function of (seed, step, rank, world size), which is what makes resume exact:
global batch k holds rows k·G … (k+1)·G − 1 of an endless sequence of seeded epoch permutations;
rank r of W takes its G/W slice of them, cut into micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from chtsl_infer.errors import ChtslError

EVAL_SHUFFLE_SEED = 42  # the paper's validation shuffle seed


@dataclass
class Rows:
    """Fixed-length token rows: `ids` (N, seq_len) int64 and `lengths` (N,) real tokens per row."""

    ids: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def labels(self, index: torch.Tensor) -> torch.Tensor:
        """Labels of rows `index`: the ids, -100 on padding (HF shifts them inside the loss)."""
        ids = self.ids[index]
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return ids.masked_fill(positions >= self.lengths[index].unsqueeze(1), -100)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


def make_rows(token_docs: Sequence[Sequence[int]], seq_len: int, pad: int, packing: bool) -> Rows:
    """Rows of `seq_len` ids: per-document truncate/pad (GaLore) or, with `packing`, one stream cut
    into full rows (the last partial row is dropped)."""
    if packing:
        flat = torch.tensor([t for doc in token_docs for t in doc], dtype=torch.int64)
        n = flat.numel() // seq_len
        ids = flat[: n * seq_len].view(n, seq_len)
        return Rows(ids, torch.full((n,), seq_len, dtype=torch.int64))
    ids = torch.full((len(token_docs), seq_len), pad, dtype=torch.int64)
    lengths = torch.zeros(len(token_docs), dtype=torch.int64)
    for i, doc in enumerate(token_docs):
        doc = doc[:seq_len]
        ids[i, : len(doc)] = torch.tensor(doc, dtype=torch.int64)
        lengths[i] = len(doc)
    keep = lengths >= 2  # a row needs one target at least
    return Rows(ids[keep], lengths[keep])


@dataclass
class Batch:
    """One micro-batch: `input_ids` (b, seq) int64, `labels` (b, seq) with -100 on padding."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def n_targets(self) -> int:
        """Tokens that enter the loss (HF predicts position t+1 from <= t)."""
        return int((self.labels[:, 1:] != -100).sum())


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


@dataclass
class TrainBatches:
    """The training stream of an in-memory corpus: `step_batches(k)` is global batch k's slice for
    this rank, a list of micro-batches (a pure function of seed, k, rank and world size)."""

    rows: Rows
    global_batch: int
    micro_batch: int
    seed: int
    rank: int = 0
    world: int = 1
    _perms: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_batch_sizes(self.global_batch, self.micro_batch, self.world)

    def _rows_at(self, positions: torch.Tensor) -> torch.Tensor:
        n = len(self.rows)
        out = torch.empty_like(positions)
        epochs = positions // n
        for e in epochs.unique().tolist():
            if e not in self._perms:
                if len(self._perms) > 4:  # a step touches at most two epochs
                    self._perms.clear()
                self._perms[e] = _permutation(n, self.seed, e)
            sel = epochs == e
            out[sel] = self._perms[e][positions[sel] % n]
        return out

    def step_batches(self, step: int) -> list[Batch]:
        """Micro-batches of 0-based step `step` for this rank."""
        local = self.global_batch // self.world
        start = step * self.global_batch + self.rank * local
        index = self._rows_at(torch.arange(start, start + local))
        return [
            Batch(self.rows.ids[i], self.rows.labels(i)) for i in index.split(self.micro_batch)
        ]


def check_batch_sizes(global_batch: int, micro_batch: int, world: int) -> int:
    """Gradient-accumulation steps = global ÷ (micro × world); ChtslError unless it divides."""
    if global_batch < 1 or micro_batch < 1:
        raise ChtslError("batch sizes must be >= 1")
    if global_batch % (micro_batch * world):
        raise ChtslError(
            f"micro batch {micro_batch} × world size {world} does not divide the global batch {global_batch}"
        )
    return global_batch // (micro_batch * world)


def eval_batches(rows: Rows, eval_tokens: int, batch_size: int) -> list[Batch]:
    """Validation rows shuffled with seed 42, the first ones holding >= `eval_tokens` real tokens
    (all of them when the split is smaller), as batches of `batch_size`."""
    perm = _permutation(len(rows), EVAL_SHUFFLE_SEED, 0)
    cum = torch.cumsum(rows.lengths[perm], 0)
    n = int(torch.searchsorted(cum, torch.tensor(eval_tokens)).item()) + 1
    perm = perm[: min(n, len(rows))]
    return [Batch(rows.ids[i], rows.labels(i)) for i in perm.split(batch_size)]


def unigram_perplexity(train: Rows, batches: Sequence[Batch], vocab_size: int) -> float:
    """Perplexity of the validation targets under add-one-smoothed training-split token frequencies:
    the baseline a model must beat to have learned anything from context."""
    real = train.ids[torch.arange(train.ids.shape[1]).unsqueeze(0) < train.lengths.unsqueeze(1)]
    counts = torch.bincount(real, minlength=vocab_size).to(torch.float64) + 1.0
    logp = (counts / counts.sum()).log()
    nll, n = 0.0, 0
    for b in batches:
        t = b.labels[:, 1:]
        t = t[t != -100]
        nll -= float(logp[t].sum())
        n += t.numel()
    return math.exp(nll / max(1, n))
