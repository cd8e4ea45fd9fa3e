"""Tokenizers: byte-level BPE trained offline (for `builtin`/`tiny`) and cached, or a Hugging Face
tokenizer by name; turning documents into EOS-terminated token ids that fit the model's vocabulary.

Trained BPEs are cached under `chtsl_infer.utils.cache_dir()/` by content and vocabulary size.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from chtsl_infer.errors import ChtslError, first_line, write_failure_reason
from chtsl_infer.utils import cache_dir, make_temp_dir

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_bpe(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `vocab_size` tokens trained on `texts`, wrapped for transformers.

    Special tokens <pad>=0, <s>=1, </s>=2, <unk>=3 (bos/eos are needed by lm-eval and generate).
    Deterministic for the same texts and vocab size.
    """
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def _fingerprint(texts: Sequence[str], *extra: Any) -> str:
    h = hashlib.sha256(json.dumps(extra).encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def bpe_tokenizer(train_texts: Sequence[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    """A byte-level BPE trained on `train_texts`, cached under `cache_dir()` by content and size."""
    from transformers import PreTrainedTokenizerFast

    from train.data.tokenizer import SPECIAL_TOKENS, train_bpe

    path = cache_dir() / f"bpe-{vocab_size}-{_fingerprint(train_texts, vocab_size)}"
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **SPECIAL_TOKENS)
    tok = train_bpe(train_texts, vocab_size=vocab_size)
    try:  # cache atomically: another process may be writing the same entry (the first one stays)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(path)
        try:
            tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
            if not path.exists():
                tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone once renamed
    except Exception as e:  # tokenizers' own save fails with a bare Exception("... (os error 28)")
        if write_failure_reason(e) is None:
            raise
        # an unwritable (full, read-only) cache only costs retraining next time
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
