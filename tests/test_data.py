"""Data pipeline: sources, split, rows (truncate/pad and packing), sharded batches, unigram ppl,
tokenizer selection and the shared perplexity computation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chtsl_infer.errors import ChtslError
from chtsl_infer.model.loss import perplexity
from tests.conftest import tiny_model
from train.data.batches import Batch, Rows, TrainBatches, check_batch_sizes, eval_batches, make_rows, unigram_perplexity
from train.data.sources import (
    _paragraph_documents,
    builtin_documents,
    builtin_documents_uncached,
    check_corpus,
    local_documents,
    split_documents,
)
from train.data.streaming import hub_documents
from train.data.tokenizer import encode_documents, resolve_tokenizer


def _docs(n: int = 60) -> list[str]:
    import pydoc_data.topics

    topics = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    return [p for t in topics for p in _paragraph_documents(t, 300)][:n]


@pytest.mark.slow  # builds the built-in corpus twice, uncached
def test_builtin_corpus_deterministic_and_split() -> None:
    a, b = builtin_documents(), builtin_documents_uncached()
    assert a == b and len(a) > 1000
    train, val = split_documents(a)
    assert len(train) + len(val) == len(a)
    assert 0.03 < len(val) / len(a) < 0.07
    assert not set(train) & set(val) or len(set(a)) < len(a)  # split by text: equal texts go together


def test_local_sources(tmp_path) -> None:
    docs = [" ".join(d.split()) for d in _docs(10)]  # no blank lines inside a document
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:4]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[4:7])))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs[7:]}), tmp_path / "c.parquet")
    assert local_documents(str(tmp_path)) == docs
    assert local_documents(str(tmp_path / "b.jsonl")) == docs[4:7]
    assert local_documents(str(tmp_path / "*.parquet")) == docs[7:]


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda p: None, "not found"),
        (lambda p: (p / "x.jsonl").write_text('{"body": "no text"}\n'), "no string `text`"),
        (lambda p: (p / "x.jsonl").write_text("{not json\n"), "not valid JSON"),
        (lambda p: (p / "x.txt").write_text("\n\n  \n\n"), "empty"),
        (lambda p: (p / "x.csv").write_text("a,b"), "no .txt"),
    ],
)
def test_local_source_errors(tmp_path, setup, match) -> None:
    target = tmp_path / "data"
    if setup(tmp_path) is not None or any(tmp_path.iterdir()):
        target = next(tmp_path.iterdir())
    if match == "no .txt":
        target = tmp_path
    with pytest.raises(ChtslError, match=match):
        local_documents(str(target))


def test_check_corpus_refuses_what_no_run_can_train_on(tmp_path) -> None:
    """`check_corpus` (what `chtsl sweep` runs before writing anything) accepts what a run reads and
    refuses, in one line, a parquet without a `text` column, with no rows or that is not parquet,
    and a corpus too small for both splits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_corpus("builtin")
    docs = [" ".join(d.split()) for d in _docs(60)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "good.parquet")
    check_corpus(str(tmp_path / "good.parquet"))
    pq.write_table(pa.table({"body": docs}), tmp_path / "body.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not a parquet file")
    pq.write_table(pa.table({"text": docs[:1]}), tmp_path / "one.parquet")
    for name, match in (("body", "no `text` column"), ("none", "empty"), ("junk", "cannot read"),
                        ("one", "too small to split")):
        with pytest.raises(ChtslError, match=match) as e:
            check_corpus(str(tmp_path / f"{name}.parquet"))
        assert "\n" not in str(e.value)


def test_rows_truncate_pad_and_packing() -> None:
    docs = [[5, 6, 7], [8] * 10, [9]]
    rows = make_rows(docs, seq_len=4, pad=0, packing=False)
    assert rows.ids.tolist() == [[5, 6, 7, 0], [8, 8, 8, 8]]  # [9] has no target: dropped
    assert rows.lengths.tolist() == [3, 4]
    assert rows.labels(torch.arange(2)).tolist() == [[5, 6, 7, -100], [8, 8, 8, 8]]
    packed = make_rows(docs, seq_len=4, pad=0, packing=True)
    assert packed.ids.flatten().tolist() == ([5, 6, 7] + [8] * 10 + [9])[:12]
    assert (packed.labels(torch.arange(3)) != -100).all()


def test_batches_shard_the_global_batch() -> None:
    rows = Rows(torch.arange(50).unsqueeze(1).repeat(1, 3), torch.full((50,), 3))
    single = TrainBatches(rows, global_batch=8, micro_batch=2, seed=3)
    ranks = [TrainBatches(rows, global_batch=8, micro_batch=2, seed=3, rank=r, world=2) for r in range(2)]
    seen = []
    for step in range(20):  # crosses epochs (50 rows / 8 per step)
        whole = torch.cat([b.input_ids[:, 0] for b in single.step_batches(step)])
        parts = torch.cat([b.input_ids[:, 0] for r in ranks for b in r.step_batches(step)])
        assert whole.tolist() == parts.tolist()
        assert len(single.step_batches(step)) == 4
        seen += whole.tolist()
    assert sorted(seen[:50]) == list(range(50))  # one epoch is a permutation
    fresh = TrainBatches(rows, global_batch=8, micro_batch=2, seed=3)
    assert fresh.step_batches(13)[1].input_ids.tolist() == single.step_batches(13)[1].input_ids.tolist()
    other = TrainBatches(rows, global_batch=8, micro_batch=2, seed=4)
    assert other.step_batches(0)[0].input_ids.tolist() != single.step_batches(0)[0].input_ids.tolist() or \
        other.step_batches(1)[0].input_ids.tolist() != single.step_batches(1)[0].input_ids.tolist()


def test_batch_size_check() -> None:
    assert check_batch_sizes(16, 4, 2) == 2
    with pytest.raises(ChtslError, match="does not divide"):
        check_batch_sizes(16, 3, 1)
    with pytest.raises(ChtslError, match="does not divide"):
        check_batch_sizes(4, 4, 2)


def test_unigram_perplexity_by_hand() -> None:
    train = Rows(torch.tensor([[1, 1, 2, 0]]), torch.tensor([3]))  # counts: 1 -> 2, 2 -> 1
    val = [Batch(torch.tensor([[2, 1, 2]]), torch.tensor([[2, 1, 2]]))]  # targets 1, 2
    vocab = 4
    p1, p2 = (2 + 1) / (3 + 4), (1 + 1) / (3 + 4)
    expected = math.exp(-(math.log(p1) + math.log(p2)) / 2)
    assert unigram_perplexity(train, val, vocab) == pytest.approx(expected, rel=1e-12)


def test_eval_batches_take_enough_tokens() -> None:
    rows = Rows(torch.arange(40).view(10, 4), torch.tensor([4, 2] * 5))
    batches = eval_batches(rows, eval_tokens=7, batch_size=2)
    n = sum(int((b.labels != -100).sum()) for b in batches)
    assert 7 <= n <= 7 + 4
    assert eval_batches(rows, 7, 2)[0].input_ids.tolist() == batches[0].input_ids.tolist()
    assert sum(b.input_ids.shape[0] for b in eval_batches(rows, 10**9, 3)) == 10


def test_bpe_cached_and_unknown_tokenizer(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CHTSL_CACHE_DIR", str(tmp_path))
    texts = _docs(40)
    a = resolve_tokenizer("bpe", texts, 300)
    assert len(list(tmp_path.glob("bpe-300-*/tokenizer.json"))) == 1
    b = resolve_tokenizer("bpe", texts, 300)
    assert a(texts[:3])["input_ids"] == b(texts[:3])["input_ids"]
    with pytest.raises(ChtslError, match="cannot load tokenizer 'no-such-org/no-such-tokenizer'"):
        resolve_tokenizer("no-such-org/no-such-tokenizer", texts, 300)
    with pytest.raises(ChtslError, match="cannot load dataset 'c4'"):
        hub_documents("c4", "train", 0, 1)


def test_encode_appends_eos_and_maps_oov(bpe_tokenizer) -> None:
    ids = encode_documents(bpe_tokenizer, ["def f(x): return x"], vocab_size=len(bpe_tokenizer))[0]
    assert ids[-1] == bpe_tokenizer.eos_token_id
    small = encode_documents(bpe_tokenizer, ["def f(x): return x"], vocab_size=300)[0]
    assert max(small) < 300 and bpe_tokenizer.unk_token_id in small


def test_perplexity_matches_hf_loss() -> None:
    model = tiny_model("chtsl")
    ids = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, 6:] = -100  # a padded row
    r = perplexity(model, [Batch(ids, labels)])
    with torch.no_grad():
        hf = model(input_ids=ids, labels=labels).loss.item()
    assert r.tokens == 3 * 8 - 3
    assert r.nll == pytest.approx(hf, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(hf), rel=1e-5)
    # Two batches = the token-weighted mean, not the mean of batch means.
    r2 = perplexity(model, [Batch(ids[:1], labels[:1]), Batch(ids[1:], labels[1:])])
    assert r2.nll == pytest.approx(r.nll, rel=1e-6) and r2.tokens == r.tokens
