"""The data pipeline of a run: source + tokenizer + rows → this rank's train stream and the
validation batches, one interface for every `--data` (`builtin`, a PATH, `c4`, `owt`).

Each job lives in its own module: `train.data.sources` (documents and the train/validation split),
`train.data.tokenizer` (BPE training and cache, HF tokenizers, encoding), `train.data.batches` (rows and
deterministic batches) and `train.data.streaming` (the hub datasets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from chtsl_infer.errors import ChtslError
from train.data.batches import (
    Batch,
    Rows,
    TrainBatches,
    check_batch_sizes,
    eval_batches,
    make_rows,
    unigram_perplexity,
)
from train.data.sources import train_val_documents
from train.data.streaming import HUB_SOURCES, StreamBatches, hub_documents
from train.data.tokenizer import encode_documents, pad_id, resolve_tokenizer


@dataclass
class DataSpec:
    """Everything that defines the data of a run (saved in `trainer_state/args.json`)."""

    data: str = "builtin"
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    seq_len: int = 128
    packing: bool = False
    eval_tokens: int = 100_000
    seed: int = 0


def spec_from_args(args: dict[str, Any]) -> DataSpec:
    """The `DataSpec` of a run from its `trainer_state/args.json` (what `chtsl eval --perplexity` uses
    to rebuild exactly the validation batches the trainer evaluated); absent or None fields keep
    `DataSpec`'s defaults."""
    names = DataSpec.__dataclass_fields__
    return DataSpec(**{k: args[k] for k in names if args.get(k) is not None})


@dataclass
class Data:
    """A resolved data pipeline: tokenizer, model vocab size, train stream, validation batches."""

    spec: DataSpec
    tokenizer: Any
    vocab_size: int
    train: TrainBatches | StreamBatches
    val: list[Batch]
    unigram_ppl: float
    train_rows: int | None  # None for streams
    train_tokens: int | None


def validation_batches(spec: DataSpec, tokenizer, eval_batch: int = 16) -> tuple[list[Batch], Rows | None]:
    """Only the validation side (what `chtsl eval --perplexity` needs); also returns the in-memory
    validation rows (None for hub sources)."""
    prepared = _prepare(spec, tokenizer, eval_batch)
    return prepared.val, prepared.val_rows


@dataclass
class _Prepared:
    """What the train and the validation side share: tokenizer, vocabulary, validation batches and,
    for in-memory sources, the (train, validation) documents."""

    tokenizer: Any
    vocab_size: int
    val: list[Batch]
    val_rows: Rows | None  # None for hub sources
    texts: tuple[list[str], list[str]] | None  # None for hub sources


def _prepare(spec: DataSpec, tokenizer, eval_batch: int) -> _Prepared:
    """Resolves the source and tokenizer (`tokenizer` None: from `spec`) and builds the validation
    batches."""
    if spec.seq_len < 2:
        raise ChtslError(f"--seq-len must be >= 2, got {spec.seq_len}")
    texts = None if spec.data in HUB_SOURCES else train_val_documents(spec.data)
    if tokenizer is None:
        tokenizer = resolve_tokenizer(spec.tokenizer, texts[0] if texts else None, spec.vocab_size)
    vocab = model_vocab_size(tokenizer, spec)
    pad = pad_id(tokenizer)
    if texts is not None:
        val_rows = make_rows(encode_documents(tokenizer, texts[1], vocab), spec.seq_len, pad, spec.packing)
        if len(val_rows) == 0:
            raise ChtslError("the validation split has no usable rows (too few tokens for --seq-len)")
        val = eval_batches(val_rows, spec.eval_tokens, eval_batch)
    else:
        val_rows, val, n = None, [], 0
        stream = StreamBatches(hub_documents(spec.data, "validation", 0, 1), tokenizer, vocab, spec.seq_len,
                               spec.packing, eval_batch, eval_batch)
        while n < spec.eval_tokens:
            try:
                b = stream.step_batches(len(val))[0]
            except ChtslError:
                break
            val.append(b)
            n += int((b.labels != -100).sum())
    return _Prepared(tokenizer, vocab, val, val_rows, texts)


def model_vocab_size(tokenizer, spec: DataSpec) -> int:
    """Embedding rows: the preset's vocab when the tokenizer is larger only by unused extra ids
    (T5: 32100 → 32000), else the tokenizer's size."""
    n = len(tokenizer)
    if spec.tokenizer != "bpe" and tokenizer.vocab_size <= spec.vocab_size < n:
        return spec.vocab_size
    return n


def build_data(spec: DataSpec, *, global_batch: int, micro_batch: int, rank: int = 0, world: int = 1,
               eval_batch: int = 16, tokenizer=None) -> Data:
    """Resolves source and tokenizer, tokenizes, and returns the train stream of this rank."""
    check_batch_sizes(global_batch, micro_batch, world)
    prepared = _prepare(spec, tokenizer, eval_batch)
    tokenizer, vocab, val, texts = prepared.tokenizer, prepared.vocab_size, prepared.val, prepared.texts
    pad = pad_id(tokenizer)
    if texts is not None:
        rows = make_rows(encode_documents(tokenizer, texts[0], vocab), spec.seq_len, pad, spec.packing)
        if len(rows) == 0:
            raise ChtslError("the training split has no usable rows (too few tokens for --seq-len)")
        stream: TrainBatches | StreamBatches = TrainBatches(rows, global_batch, micro_batch, spec.seed, rank, world)
        uni = unigram_perplexity(rows, val, vocab)
        n_rows, n_tok = len(rows), rows.n_tokens
    else:
        docs = hub_documents(spec.data, "train", rank, world)
        stream = StreamBatches(docs, tokenizer, vocab, spec.seq_len, spec.packing, global_batch, micro_batch, world)
        # Unigram counts from the first ~eval_tokens training tokens of this rank's shard.
        probe = StreamBatches(hub_documents(spec.data, "train", 0, 1), tokenizer, vocab, spec.seq_len,
                              spec.packing, 64, 64)
        ids, lengths, n = [], [], 0
        while n < spec.eval_tokens:
            b = probe.step_batches(len(ids))[0]
            ids.append(b.input_ids)
            lengths.append((b.labels != -100).sum(1))
            n += int(lengths[-1].sum())
        uni = unigram_perplexity(Rows(torch.cat(ids), torch.cat(lengths)), val, vocab)
        n_rows = n_tok = None
    return Data(spec, tokenizer, vocab, stream, val, uni, n_rows, n_tok)
