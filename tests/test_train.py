"""`chtsl train` end to end on a smaller-than-tiny model: loss, OCR, topology, checkpoints, methods,
bad input, NaN stop, plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from chtsl_infer.cli import main
from chtsl_infer.errors import ChtslError
from tests.conftest import TRAIN_STEPS, corpus, metrics, small_args
from train.args import TrainArgs
from train.trainer import train

STEPS = TRAIN_STEPS
pytestmark = pytest.mark.usefixtures("one_thread", "cache_dir")


@pytest.mark.slow  # a full training run through the CLI
def test_chtsl_run_end_to_end(tmp_path) -> None:
    r = train(small_args(tmp_path))
    out = Path(r.out)
    assert r.step == STEPS and r.stopped is None
    recs = metrics(out)
    start, steps = recs[0], [m for m in recs if "step" in m]
    assert start["event"] == "start" and start["unigram_ppl"] > 1
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    assert steps[-1]["task_loss"] < steps[0]["task_loss"] - 0.5
    assert all(m["align_loss"] > 0 for m in steps)
    assert all(m["loss"] == pytest.approx(m["task_loss"] + 0.3 * m["align_loss"], rel=1e-9) for m in steps)
    # Topology updates at 5 and 10 (T_end = 15, where ζ_t = 0 could change nothing: no update there);
    # both change the masks; the LR restarts its warm-up after each.
    updates = [m for m in steps if "topology" in m]
    assert [m["step"] for m in updates] == [5, 10]
    assert [m["topology"]["frac_changed"] > 0 for m in updates] == [True, True]
    lr = {m["step"]: m["lr"] for m in steps}
    assert lr[6] < lr[7] and lr[6] < 0.5 * lr[4]
    # OCR and cosine of every layer (2 blocks × 7) on OCR steps, in [0, 1) and [-1, 1].
    from chtsl_infer.formats.model_dir import load_model

    model = load_model(out)
    names = set(model.chtsl_layers())
    ocr_steps = [m for m in steps if "ocr" in m]
    assert [m["step"] for m in ocr_steps] == [1, 5, 10, 15, 20]
    for m in ocr_steps:
        assert set(m["ocr"]) == names == set(m["cosine"])
        assert all(0 <= v < 1 for v in m["ocr"].values())
    evals = [m for m in steps if "val_ppl" in m]
    assert [m["step"] for m in evals] == [10, 20]
    assert r.val_ppl == evals[-1]["val_ppl"] < start["unigram_ppl"] * 5  # sane scale; learning is the 300-step run

    # The checkpoint: HF-loadable through the Auto classes, with its tokenizer and trainer state.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import chtsl_infer  # noqa: F401

    auto = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(auto).__name__ == "ChtslLlamaForCausalLM" and len(tok) == auto.config.vocab_size
    ids = torch.tensor([tok("def f(x): return x")["input_ids"]])
    torch.testing.assert_close(auto(ids).logits, model(ids).logits, rtol=0, atol=0)
    state = json.loads((out / "trainer_state" / "state.json").read_text())
    args = json.loads((out / "trainer_state" / "args.json").read_text())
    assert state["step"] == STEPS and args["data"] == str(corpus(tmp_path)) and args["seq_len"] == 32
    # The validation perplexity is reproducible from the saved arguments (what `chtsl eval` does).
    from chtsl_infer.model.loss import perplexity
    from train.data.pipeline import spec_from_args, validation_batches

    val, _ = validation_batches(spec_from_args(args), tok, eval_batch=args["micro_batch_size"])
    assert perplexity(auto, val).ppl == pytest.approx(r.val_ppl, rel=1e-6)
    # Masks at their per-group targets after the updates: trainable count as `chtsl info` reports.
    from chtsl_infer.commands.info import budget_report

    assert model.trainable_linear_params() == budget_report(model.config)["totals"]["trainable_linear_params"]

    # chtsl plot: the PNGs, and --json lists them
    with pytest.raises(SystemExit) as e:
        main(["plot", str(out), "--out", str(tmp_path / "plots"), "--json", str(tmp_path / "plots.json")])
    assert e.value.code in (0, None)
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"loss.png", "val_ppl.png", "ocr.png"}
    written = json.loads((tmp_path / "plots.json").read_text())
    assert sorted(written["files"]) == sorted(str(p) for p in (tmp_path / "plots").iterdir())


@pytest.mark.slow  # a short training run per method
@pytest.mark.parametrize("method", ["dense", "chts", "cola", "sltrain", "naive", "act"])
def test_every_method_trains(tmp_path, method) -> None:
    # Updates at 3 only (T_end = 6): after it every group holds its target link count.
    r = train(small_args(tmp_path, method=method, steps=8, eval_every=8, save_every=8, ocr_every=3, update_interval=3,
                         restart_warmup=1))
    assert r.step == 8 and math.isfinite(r.loss) and r.val_ppl is not None
    from chtsl_infer.commands.info import budget_report
    from chtsl_infer.formats.model_dir import load_model
    from chtsl_infer.model.presets import build_config

    model = load_model(r.out)
    assert model.config.method == method
    # Same flags through `chtsl info`'s report (the CLI builds exactly this config).
    config = build_config("tiny", method=method, s_total=0.9, vocab_size=model.config.vocab_size, num_hidden_layers=2)
    expected = budget_report(config)["totals"]["trainable_linear_params"]
    assert model.trainable_linear_params() == expected
    recs = [m for m in metrics(Path(r.out)) if "step" in m]
    assert all(m["align_loss"] == 0 for m in recs)  # only chtsl aligns
    assert ("ocr" in recs[0]) == (method in ("sltrain", "naive", "act"))
    assert ("topology" in recs[2]) == (method in ("chts", "naive", "act"))
    if method == "cola":
        assert "grad_norm" in recs[0]  # CoLA's recipe clips at 0.5


def test_bf16_autocast_on_cpu(tmp_path) -> None:
    """`--dtype bf16` on CPU runs the trainer's mixed-precision path (autocast forward, fp32 task
    loss, alignment and OCR on bf16 branch outputs) end to end, as CUDA training does by default."""
    dtypes: list[torch.dtype] = []

    def watch(step: int, model: torch.nn.Module) -> None:
        if step == 1:  # from step 2 on, the dtype the training forwards' matmuls produce (not eval's)
            model.lm_head.register_forward_hook(lambda m, _i, out: dtypes.append(out.dtype) if m.training else None)

    fields = dict(steps=6, update_interval=2, restart_warmup=1, ocr_every=3, eval_every=6, save_every=6)
    r = train(small_args(tmp_path, dtype="bf16", device="cpu", **fields), after_step=watch)
    assert r.step == 6 and r.stopped is None and math.isfinite(r.loss) and math.isfinite(r.val_ppl)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    steps = [m for m in metrics(Path(r.out)) if "step" in m]
    assert all(math.isfinite(m["task_loss"]) and m["align_loss"] > 0 for m in steps)
    assert [m["step"] for m in steps if "ocr" in m] == [1, 3, 6]
    assert all(0 <= v < 1 for m in steps if "ocr" in m for v in m["ocr"].values())
    assert [(m["step"], m["topology"]["frac_changed"] > 0) for m in steps if "topology" in m] == [(2, True), (4, True)]
    # Reference: the fp32 run's first step (same seed, data and init) within bf16's rounding.
    ref = train(small_args(tmp_path, dtype="fp32", device="cpu", stop_at=1, out=str(tmp_path / "fp32"), **fields))
    first = metrics(Path(ref.out))[1]
    assert first["step"] == 1
    assert steps[0]["task_loss"] == pytest.approx(first["task_loss"], rel=1e-2)
    assert steps[0]["align_loss"] == pytest.approx(first["align_loss"], rel=5e-2)
    assert steps[0]["task_loss"] != first["task_loss"]  # bf16 really computed something else


def test_packing_run(tmp_path) -> None:
    r = train(small_args(tmp_path, packing=True, steps=3, warmup=1, eval_every=3, save_every=3))
    args = json.loads((Path(r.out) / "trainer_state" / "args.json").read_text())
    assert r.step == 3 and math.isfinite(r.val_ppl) and args["packing"] is True
    start = metrics(Path(r.out))[0]
    assert start["train_tokens"] == start["train_rows"] * 32  # packed rows are full


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path) -> None:
    def poison(step: int, model: torch.nn.Module) -> None:
        if step == 3:
            with torch.no_grad():
                model.model.embed_tokens.weight.fill_(float("nan"))

    r = train(small_args(tmp_path, steps=6, save_every=2, eval_every=100), after_step=poison)
    assert r.stopped == "nan" and r.step == 3  # step 4's loss is NaN: stopped before its optimizer step
    state = json.loads((Path(r.out) / "trainer_state" / "state.json").read_text())
    assert state["step"] == 2
    from chtsl_infer.formats.model_dir import load_model

    model = load_model(r.out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # drop what earlier in-process runs printed (their run headers)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_one_line_exit_2(tmp_path, capsys) -> None:
    base = ["train", "--num-layers", "2", "--seq-len", "32", "--batch-size", "8", "--micro-batch-size", "4",
            "--steps", "2", "--vocab-size", "512", "--no-progress"]
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "notext.jsonl").write_text('{"body": 1}\n')
    cases = [
        (["--data", str(tmp_path / "missing.txt")], "not found"),
        (["--data", str(tmp_path / "empty.txt")], "empty"),
        (["--data", str(tmp_path / "notext.jsonl")], "text"),
        (["--data", str(corpus(tmp_path)), "--tokenizer", "no-such-org/no-such-tok"], "cannot load tokenizer"),
        (["--data", str(corpus(tmp_path)), "--resume", str(tmp_path)], "not a chtsl training checkpoint"),
        (["--data", str(corpus(tmp_path)), "--micro-batch-size", "3"], "does not divide"),
        (["--data", str(corpus(tmp_path)), "--method", "bogus"], "unknown method"),
        (["--data", "c4"], "cannot load"),
    ]
    for extra, match in cases:
        err = _cli_error(capsys, [*base, "--out", str(out), *extra])
        assert match in err, (extra, err)
        assert not out.exists()  # nothing written
    # An existing checkpoint is never overwritten by a fresh run.
    r = train(small_args(tmp_path, steps=2, warmup=1, save_every=2, eval_every=2))
    before = (Path(r.out) / "model.safetensors").read_bytes()
    err = _cli_error(capsys, [*base, "--data", str(corpus(tmp_path)), "--out", r.out])
    assert "already holds a checkpoint" in err
    assert (Path(r.out) / "model.safetensors").read_bytes() == before
    with pytest.raises(ChtslError, match="cannot change on resume"):
        train(TrainArgs(resume=r.out, seq_len=64, progress=False))
