"""Training and validation data: sources, tokenizer selection, fixed-length rows and batches.

One interface for every source (`--data`):

- `builtin` (default): an offline corpus built deterministically from the documentation every
  CPython ships (`pydoc_data.topics` and the stdlib's docstrings, read with `ast`, nothing imported);
- `PATH`: a file, directory or glob of `.txt` (documents separated by blank lines), `.jsonl` (a
  `text` field per line) or `.parquet` (a `text` column);
- `c4` / `owt`: Hugging Face `datasets` as in the paper (C4 `en` streamed; OpenWebText with 5 %
  held out, seed 42).

In-memory sources (builtin, PATH) split documents into train/validation by a hash of their text
(5 % validation), so the split does not depend on file order. Documents become rows of `seq_len`
token ids: GaLore-style (default) each document is truncated/padded to `seq_len` and padded
positions are ignored in the loss (label -100); `packing` concatenates documents (each followed by
EOS) and cuts the stream into full rows.

Batches are a pure function of (seed, step, rank, world size), which is what makes resume exact:
global batch k holds rows k·G … (k+1)·G − 1 of an endless sequence of seeded epoch permutations;
rank r of W takes its G/W slice of them, cut into micro-batches.
"""

from __future__ import annotations

import ast
import functools
import glob
import hashlib
import json
import math
import os
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chtsl_infer.console import iter_jsonl
from chtsl_infer.errors import ChtslError, first_line

VAL_FRACTION_PER_MILLE = 50  # 5 % of documents go to validation
EVAL_SHUFFLE_SEED = 42  # the paper's validation shuffle seed
HUB_SOURCES = {"c4": ("allenai/c4", "en"), "owt": ("Skylion007/openwebtext", None)}
_BUILTIN_DOC_CHARS = 600  # builtin paragraphs are grouped into documents of about this size
_SKIP_STDLIB = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip",
                "turtledemo", "__pycache__", "tkinter"}


def cache_dir() -> Path:
    """Where trained tokenizers are cached: `$CHTSL_CACHE` or `~/.cache/chtsl`."""
    return Path(os.environ.get("CHTSL_CACHE") or Path.home() / ".cache" / "chtsl")


# ----------------------------------------------------------------------------- documents


def _paragraph_documents(text: str, target_chars: int = _BUILTIN_DOC_CHARS) -> list[str]:
    """Greedy groups of consecutive blank-line-separated paragraphs of about `target_chars`."""
    docs, current = [], ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= target_chars:
            docs.append(current)
            current = ""
    if current:
        docs.append(current)
    return docs


@functools.lru_cache(maxsize=1)
def _builtin_documents() -> tuple[str, ...]:
    return tuple(builtin_documents_uncached())


def builtin_documents() -> list[str]:
    """The built-in corpus (computed once per process); see `builtin_documents_uncached`."""
    return list(_builtin_documents())


def builtin_documents_uncached() -> list[str]:
    """The built-in corpus: pydoc topics and stdlib docstrings (>= 200 chars) as ~600-char documents.

    Deterministic for a given CPython (sorted topics, sorted files, `ast` walk order).
    """
    import pydoc_data.topics

    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in _SKIP_STDLIB or p.startswith("test") for p in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    texts.append(doc)
    return [d for t in texts for d in _paragraph_documents(t)]


def _expand_paths(spec: str) -> list[Path]:
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".jsonl", ".parquet"))
    elif p.is_file():
        files = [p]
    elif any(c in spec for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(spec), recursive=True) if Path(f).is_file())
    else:
        raise ChtslError(f"data path not found: {spec}")
    if not files:
        raise ChtslError(f"no .txt, .jsonl or .parquet files in {spec}")
    return files


def _read_file(path: Path) -> list[str]:
    try:
        if path.suffix == ".jsonl":
            docs = []
            for lineno, record in iter_jsonl(path):
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ChtslError(f"{path}:{lineno} has no string `text` field")
                docs.append(record["text"])
            return docs
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise ChtslError(f"{path} has no `text` column (columns: {', '.join(table.column_names)})")
            return [t for t in table.column("text").to_pylist() if isinstance(t, str)]
        return [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
    except ChtslError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ChtslError(f"cannot read {path}: {first_line(e)}") from None


def local_documents(spec: str) -> list[str]:
    """Non-empty documents of the files named by `spec` (file, directory or glob), in path order."""
    docs = [d for f in _expand_paths(spec) for d in _read_file(f) if d and d.strip()]
    if not docs:
        raise ChtslError(f"the corpus {spec} is empty (no non-blank documents)")
    return docs


def split_documents(docs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, validation): a document is validation iff crc32(text) mod 1000 < 50 (5 %)."""
    train, val = [], []
    for d in docs:
        (val if zlib.crc32(d.encode("utf-8")) % 1000 < VAL_FRACTION_PER_MILLE else train).append(d)
    if not train or not val:
        raise ChtslError(f"the corpus is too small to split into train and validation ({len(docs)} documents)")
    return train, val


# ----------------------------------------------------------------------------- tokenizers


def _fingerprint(texts: Sequence[str], *extra: Any) -> str:
    h = hashlib.sha256(json.dumps(extra).encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def bpe_tokenizer(train_texts: Sequence[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    """A byte-level BPE trained on `train_texts`, cached under `cache_dir()` by content and size."""
    from transformers import PreTrainedTokenizerFast

    from train.tokenizer import SPECIAL_TOKENS, train_bpe

    path = cache_dir() / f"bpe-{vocab_size}-{_fingerprint(train_texts, vocab_size)}"
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **SPECIAL_TOKENS)
    tok = train_bpe(train_texts, vocab_size=vocab_size)
    try:  # cache atomically: another process may be writing the same entry
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.mkdir(exist_ok=True)
        tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        if not path.exists():
            tmp.rename(path)
    except OSError:
        pass  # an unwritable cache only costs retraining next time
    return tok


def resolve_tokenizer(name: str, train_texts: Sequence[str] | None, vocab_size: int):
    """`bpe` (trained on `train_texts`) or a Hugging Face tokenizer name/path (offline-safe)."""
    if name == "bpe":
        if train_texts is None:
            raise ChtslError("--tokenizer bpe needs a local or builtin corpus to train on; pass a tokenizer name")
        return bpe_tokenizer(train_texts, vocab_size)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; the user needs one line
        raise ChtslError(f"cannot load tokenizer {name!r} (offline or unknown): {first_line(e)}") from None


def pad_id(tokenizer) -> int:
    """The pad id: the tokenizer's pad, else EOS, else UNK, else 0 (pads never reach the loss)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if tid is not None:
            return int(tid)
    return 0


def encode_documents(tokenizer, docs: Sequence[str], vocab_size: int) -> list[list[int]]:
    """Token ids of each document, EOS-terminated; ids >= `vocab_size` (e.g. T5's unused extra ids)
    become UNK so they fit the model's embedding."""
    ids = tokenizer(list(docs), add_special_tokens=True)["input_ids"]
    eos, unk = tokenizer.eos_token_id, tokenizer.unk_token_id
    out = []
    for seq in ids:
        if eos is not None and (not seq or seq[-1] != eos):
            seq = [*seq, eos]
        out.append([t if t < vocab_size else (unk if unk is not None else 0) for t in seq])
    return out


# ----------------------------------------------------------------------------- rows and batches


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


# ----------------------------------------------------------------------------- streaming (hub)


def _hub_split(name: str, split: str, rank: int, world: int):
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


# ----------------------------------------------------------------------------- the whole pipeline


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
    to rebuild exactly the validation batches the trainer evaluated)."""
    names = DataSpec.__dataclass_fields__
    return DataSpec(**{k: args[k] for k in names if k in args})


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
    return _build(spec, tokenizer=tokenizer, eval_batch=eval_batch, train=False)[1:]


def _texts(spec: DataSpec) -> tuple[list[str], list[str]] | None:
    if spec.data in HUB_SOURCES:
        return None
    docs = builtin_documents() if spec.data == "builtin" else local_documents(spec.data)
    return split_documents(docs)


def _build(spec: DataSpec, *, tokenizer=None, eval_batch: int, train: bool, global_batch: int = 1,
           micro_batch: int = 1, rank: int = 0, world: int = 1):
    if spec.seq_len < 2:
        raise ChtslError(f"--seq-len must be >= 2, got {spec.seq_len}")
    texts = _texts(spec)
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
        stream = StreamBatches(_hub_split(spec.data, "validation", 0, 1), tokenizer, vocab, spec.seq_len,
                               spec.packing, eval_batch, eval_batch)
        while n < spec.eval_tokens:
            try:
                b = stream.step_batches(len(val))[0]
            except ChtslError:
                break
            val.append(b)
            n += int((b.labels != -100).sum())
    if not train:
        return tokenizer, val, val_rows
    return tokenizer, vocab, val, texts


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
    tokenizer, vocab, val, texts = _build(spec, tokenizer=tokenizer, eval_batch=eval_batch, train=True)
    pad = pad_id(tokenizer)
    if texts is not None:
        rows = make_rows(encode_documents(tokenizer, texts[0], vocab), spec.seq_len, pad, spec.packing)
        if len(rows) == 0:
            raise ChtslError("the training split has no usable rows (too few tokens for --seq-len)")
        stream: TrainBatches | StreamBatches = TrainBatches(rows, global_batch, micro_batch, spec.seed, rank, world)
        uni = unigram_perplexity(rows, val, vocab)
        n_rows, n_tok = len(rows), rows.n_tokens
    else:
        docs = _hub_split(spec.data, "train", rank, world)
        stream = StreamBatches(docs, tokenizer, vocab, spec.seq_len, spec.packing, global_batch, micro_batch, world)
        # Unigram counts from the first ~eval_tokens training tokens of this rank's shard.
        probe = StreamBatches(_hub_split(spec.data, "train", 0, 1), tokenizer, vocab, spec.seq_len,
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
