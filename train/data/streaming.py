"""The hub sources (`--data c4|owt`): Hugging Face `datasets` as in the paper, streamed.

C4 `en` is streamed; OpenWebText has one split, of which 5 % is held out (seed 42). Each rank
reads its own shard of the training stream; validation is the first `eval_tokens` of the shuffled
validation split.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from chtsl_infer.errors import ChtslError, first_line
from train.data.batches import EVAL_SHUFFLE_SEED, Batch, Rows
from train.data.tokenizer import encode_documents, pad_id

HUB_SOURCES = {"c4": ("allenai/c4", "en"), "owt": ("Skylion007/openwebtext", None)}


def hub_documents(name: str, split: str, rank: int, world: int):
    """A `datasets` iterable of documents of c4/owt for this rank; ChtslError when unreachable."""
    try:
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        path, config = HUB_SOURCES[name]
        if name == "c4":
            ds = load_dataset(path, config, split="validation" if split == "validation" else "train", streaming=True)
        else:  # OpenWebText has one split: hold 5 % out, seed 42 (as the paper)
            full = load_dataset(path, split="train").train_test_split(test_size=0.05, seed=EVAL_SHUFFLE_SEED)
            ds = full["test" if split == "validation" else "train"].to_iterable_dataset()
        if split == "validation":
            ds = ds.shuffle(seed=EVAL_SHUFFLE_SEED, buffer_size=10_000)
        return split_dataset_by_node(ds, rank=rank, world_size=world) if world > 1 and split == "train" else ds
    except Exception as e:  # noqa: BLE001 - network/offline/format errors: one line for the user
        raise ChtslError(f"cannot load dataset {name!r} (needs the Hugging Face hub): {first_line(e)}") from None


@dataclass
class StreamBatches:
    """The training stream of a hub dataset: sequential rows of this rank's shard; resuming at step
    k skips the rows of the first k steps (re-tokenized, so resuming a long run costs time)."""

    docs: Any
    tokenizer: Any
    vocab_size: int
    seq_len: int
    packing: bool
    global_batch: int
    micro_batch: int
    world: int = 1
    _it: Iterator[tuple[list[int], int]] | None = None
    _next_step: int = 0

    def _row_iter(self) -> Iterator[tuple[list[int], int]]:
        pad, buf = pad_id(self.tokenizer), []
        for record in self.docs:
            text = record["text"] if isinstance(record, dict) else record
            ids = encode_documents(self.tokenizer, [text], self.vocab_size)[0]
            if self.packing:
                buf.extend(ids)
                while len(buf) >= self.seq_len:
                    yield buf[: self.seq_len], self.seq_len
                    buf = buf[self.seq_len :]
            elif len(ids) >= 2:
                ids = ids[: self.seq_len]
                yield ids + [pad] * (self.seq_len - len(ids)), len(ids)

    def step_batches(self, step: int) -> list[Batch]:
        local = self.global_batch // self.world
        if self._it is None or step < self._next_step:
            self._it, self._next_step = self._row_iter(), 0
        while self._next_step < step:  # skip to `step` (resume)
            for _ in range(local):
                next(self._it)
            self._next_step += 1
        try:
            rows = [next(self._it) for _ in range(local)]
        except StopIteration:
            raise ChtslError("the training stream ended before the last step") from None
        self._next_step += 1
        r = Rows(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]))
        return [Batch(r.ids[i], r.labels(i)) for i in torch.arange(local).split(self.micro_batch)]
