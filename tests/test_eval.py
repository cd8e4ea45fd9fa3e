"""`chtsl eval`: lm-eval zero-shot tasks offline, checked against an independent scorer, and perplexity.

The reference scorer here shares no code with the harness: prompts are written out from lm-eval's
task YAML (glue/rte, glue/cola, glue/mrpc default.yaml; super_glue/copa utils.py), continuations
are `target_delimiter` (" ") + choice, and a choice's score is the summed log-probability of its
tokens from a plain forward pass, as lm-eval documents for `multiple_choice` tasks. Everything
runs offline on a tiny model; lm-eval is imported and run once per module (fixtures).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_DATA, run_cli, tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
TASKS = ("rte", "copa", "cola", "mrpc")


# ----------------------------------------------------------------------------- reference scorer


def _copa_choice(text: str) -> str:
    return " " + text[0].lower() + text[1:]


def reference_prompts(task: str, doc: dict) -> tuple[str, list[str], int]:
    """(context, continuations, gold index) of one document, written from lm-eval's task YAML."""
    if task == "rte":  # doc_to_text "{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:"
        ctx, choices = f"{doc['sentence1']}\nQuestion: {doc['sentence2']} True or False?\nAnswer:", ["True", "False"]
    elif task == "cola":
        ctx, choices = f"{doc['sentence']}\nQuestion: Does this sentence make sense?\nAnswer:", ["no", "yes"]
    elif task == "mrpc":
        ctx = (f"Sentence 1: {doc['sentence1']}\nSentence 2: {doc['sentence2']}\n"
               "Question: Do both sentences mean the same thing?\nAnswer:")
        choices = ["no", "yes"]
    elif task == "copa":  # premise without its final period + connector; choices lower-cased, " "-prefixed
        connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
        ctx = doc["premise"].strip()[:-1] + f" {connector}"
        choices = [_copa_choice(doc["choice1"]), _copa_choice(doc["choice2"])]
    else:
        raise KeyError(task)
    return ctx, [" " + c for c in choices], int(doc["label"])


@torch.no_grad()
def reference_loglikelihood(model, tokenizer, context: str, continuation: str, max_length: int) -> float:
    """Summed log p(continuation | context) from one forward pass.

    As lm-eval documents for causal models: trailing spaces of the context belong to the
    continuation; the pair is tokenized whole and split at the context's token count; inputs
    longer than the model keep their last `max_length` + 1 tokens.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_cont = len(whole) - len(tokenizer(context, add_special_tokens=False)["input_ids"])
    seq = torch.tensor(whole[-(max_length + 1) :])
    logp = torch.log_softmax(model(input_ids=seq[None, :-1]).logits[0].float(), dim=-1)
    targets = seq[-n_cont:]
    return float(logp[-n_cont:].gather(1, targets[:, None]).sum())


def reference_scores(model, tokenizer, task: str, path: Path) -> list[tuple[list[float], int]]:
    """Per document: (log-likelihood of each choice, gold index)."""
    out = []
    for line in path.read_text().splitlines():
        ctx, conts, gold = reference_prompts(task, json.loads(line))
        lls = [reference_loglikelihood(model, tokenizer, ctx, c, model.config.max_position_embeddings) for c in conts]
        out.append((lls, gold))
    return out


def predictions(scores: list[tuple[list[float], int]]) -> tuple[list[int], list[int]]:
    """(argmax choice per document, first index on ties as numpy, gold labels)."""
    return [max(range(len(lls)), key=lambda i: (lls[i], -i)) for lls, _ in scores], [g for _, g in scores]


def binary_counts(preds: list[int], golds: list[int]) -> tuple[int, int, int, int]:
    tp = sum(p == 1 and g == 1 for p, g in zip(preds, golds, strict=True))
    tn = sum(p == 0 and g == 0 for p, g in zip(preds, golds, strict=True))
    fp = sum(p == 1 and g == 0 for p, g in zip(preds, golds, strict=True))
    fn = sum(p == 0 and g == 1 for p, g in zip(preds, golds, strict=True))
    return tp, tn, fp, fn


def mcc(preds: list[int], golds: list[int]) -> float:
    tp, tn, fp, fn = binary_counts(preds, golds)
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def f1(preds: list[int], golds: list[int]) -> float:
    tp, _, fp, fn = binary_counts(preds, golds)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


# ----------------------------------------------------------------------------- fixtures


# slow: its fixtures train and export a checkpoint, then every test runs lm-eval on it
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def eval_checkpoint(tmp_path_factory, bpe_tokenizer) -> Path:
    """A tiny checkpoint whose choices depend on the document: initialised with std 1 (not 0.02,
    where every document gets the same answer), seed picked so that on all four fixtures both
    choices are predicted (cola mcc 0.41, mrpc f1 0.29 here), so the metric checks are not 0 == 0."""
    path = tmp_path_factory.mktemp("eval-ckpt")
    model = tiny_model("chtsl", seed=23, vocab_size=len(bpe_tokenizer), initializer_range=1.0)
    model.save_pretrained(path)
    bpe_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fixture_run(eval_checkpoint, tmp_path_factory):
    """`chtsl eval` on the four hand-written fixtures with HF_HUB_OFFLINE=1 and every socket
    connection and name lookup refused and recorded: (exit code, stdout, results JSON, samples, attempts)."""
    out_dir = tmp_path_factory.mktemp("eval-out")
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)  # libraries swallow failed connections: record lookups too
        code, stdout, stderr = run_cli([
            "eval", str(eval_checkpoint), "--tasks", ",".join(TASKS), "--data-dir", str(FIXTURES),
            "--batch-size", "4", "--device", "cpu", "--output", str(out_dir / "res.json"), "--log-samples",
        ])
    assert code == 0, stderr
    results = json.loads((out_dir / "res.json").read_text())
    samples = [json.loads(line) for line in (out_dir / "res.samples.jsonl").read_text().splitlines()]
    return code, stdout, results, samples, attempts


@pytest.fixture(scope="module")
def reference_model_and_tokenizer(eval_checkpoint):
    """The checkpoint as the reference scorer sees it: loaded, fp32, eval mode."""
    from chtsl_infer.formats.model_dir import load_model, load_tokenizer

    return load_model(eval_checkpoint), load_tokenizer(eval_checkpoint)


@pytest.fixture(scope="module")
def reference(reference_model_and_tokenizer):
    """Reference scores of every fixture document: {task: [(choice log-likelihoods, gold)]}."""
    model, tok = reference_model_and_tokenizer
    paths = {"rte": "glue/rte", "cola": "glue/cola", "mrpc": "glue/mrpc", "copa": "super_glue/copa"}
    return {t: reference_scores(model, tok, t, FIXTURES / paths[t] / "validation.jsonl") for t in TASKS}


# ----------------------------------------------------------------------------- lm-eval tasks


def test_offline_no_network(fixture_run):
    *_, attempts = fixture_run
    assert attempts == []


@pytest.mark.parametrize("task", ["rte", "copa"])
def test_accuracy_matches_reference(fixture_run, reference, task):
    _, stdout, results, _, _ = fixture_run
    preds, golds = predictions(reference[task])
    assert len(set(preds)) == 2, "the test model should not prefer one choice everywhere"
    expected = sum(p == g for p, g in zip(preds, golds, strict=True)) / len(golds)
    assert results["results"][task]["acc,none"] == pytest.approx(expected, abs=1e-12)
    row = next(line for line in stdout.splitlines() if f" {task} " in line and " acc " in line)
    assert f"{expected:.4f}" in row and f" {len(golds)} " in row  # the table: value and n


def test_loglikelihoods_match_reference(fixture_run, reference):
    """Every choice's score lm-eval logged equals the plain forward pass (fp32, atol 1e-4)."""
    _, _, _, samples, _ = fixture_run
    for task in TASKS:
        logged = sorted((s for s in samples if s["task"] == task), key=lambda s: s["doc_id"])
        assert len(logged) == len(reference[task])
        for s, (lls, gold) in zip(logged, reference[task], strict=True):
            assert s["target"] == gold or task == "copa"  # copa's target is the gold text
            got = [float(r[0]) for r in s["filtered_resps"]]
            assert got == pytest.approx(lls, abs=1e-4, rel=1e-5), (task, s["doc_id"])


def test_cola_mcc_and_mrpc_acc_f1(fixture_run, reference):
    _, stdout, results, _, _ = fixture_run
    cola, mrpc = results["results"]["cola"], results["results"]["mrpc"]
    preds, golds = predictions(reference["cola"])
    assert len(set(preds)) == 2, "the test model should not give one answer everywhere"
    assert cola["mcc,none"] == pytest.approx(mcc(preds, golds), abs=1e-9)
    assert "acc,none" not in cola
    preds, golds = predictions(reference["mrpc"])
    assert len(set(preds)) == 2
    assert mrpc["acc,none"] == pytest.approx(sum(p == g for p, g in zip(preds, golds, strict=True)) / 10, abs=1e-12)
    assert mrpc["f1,none"] == pytest.approx(f1(preds, golds), abs=1e-9)
    assert all(math.isfinite(mrpc[k]) for k in ("acc_stderr,none", "f1_stderr,none"))
    table = {tuple(line.split("│")[1:3]) for line in stdout.splitlines() if "│" in line}
    names = {(t.strip(), m.strip()) for t, m in table}
    assert {("cola", "mcc"), ("mrpc", "acc"), ("mrpc", "f1")} <= names


def test_results_json_is_lm_evals(fixture_run):
    _, _, results, samples, _ = fixture_run
    assert set(results["results"]) == set(TASKS)
    assert results["n-samples"]["rte"]["effective"] == 10
    assert results["configs"]["rte"]["dataset_path"] == "json"
    assert "tag" not in results["configs"]["rte"]  # local copies never join lm-eval's `glue` tag
    assert "samples" not in results
    assert {s["task"] for s in samples} == set(TASKS) and len(samples) == 40


def test_list_tasks():
    code, stdout, _ = run_cli(["eval", "--list-tasks"])
    names = {line.split()[0] for line in stdout.splitlines() if line.strip()}
    assert code == 0
    assert {"cola", "copa", "hellaswag", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "boolq", "cb", "wic", "wsc",
            "sglue_rte", "wnli", "glue", "super-glue-lm-eval-v1"} <= names


def test_groups_expand_and_record_is_rejected():
    from chtsl_infer.errors import ChtslError
    from evals.harness import resolve_tasks

    tasks, notes = resolve_tasks("rte,glue")
    assert tasks[0] == "rte" and tasks.count("rte") == 1 and "mnli" in tasks and "cola" in tasks
    tasks, notes = resolve_tasks("super-glue-lm-eval-v1")
    assert "copa" in tasks and "record" not in tasks and "record" in notes[0]
    with pytest.raises(ChtslError, match="record"):
        resolve_tasks("record")


def test_groups_are_lm_evals_tags():
    """GROUPS (plus the unsupported record) are exactly lm-eval's `glue` / `super-glue-lm-eval-v1` tags,
    read from its task YAML (TaskManager's full index takes half a minute on this machine)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    from evals.harness import GROUPS, UNSUPPORTED

    root = Path(lm_eval.tasks.__file__).parent
    members: dict[str, set[str]] = {g: set() for g in GROUPS}
    for folder in ("glue", "super_glue"):
        for path in sorted((root / folder).rglob("*.yaml")):
            config = load_yaml(path, resolve_func=False)
            tags = config.get("tag") or []
            for tag in [tags] if isinstance(tags, str) else tags:
                if tag in members:
                    members[tag].add(config["task"])
    assert members["glue"] == set(GROUPS["glue"])
    assert members["super-glue-lm-eval-v1"] == set(GROUPS["super-glue-lm-eval-v1"]) | set(UNSUPPORTED)


def _one_line_error(argv: list[str]) -> str:
    code, stdout, stderr = run_cli(argv)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    return lines[0]


def test_bad_input_one_line(eval_checkpoint, tmp_path):
    msg = _one_line_error(["eval", str(eval_checkpoint), "--tasks", "rte,nope"])
    assert "'nope'" in msg and all(n in msg for n in ("cola", "copa", "rte", "glue", "hellaswag"))
    expected = tmp_path / "super_glue" / "copa" / "validation.jsonl"
    msg = _one_line_error(["eval", str(eval_checkpoint), "--tasks", "copa", "--data-dir", str(tmp_path)])
    assert str(expected) in msg
    msg = _one_line_error(["eval", str(tmp_path), "--tasks", "rte"])
    assert "not a chtsl checkpoint" in msg
    msg = _one_line_error(["eval", str(eval_checkpoint), "--tasks", "rte", "--log-samples"])
    assert "--json" in msg


@pytest.mark.slow  # lm-eval over several local tasks
def test_more_tasks_local_layout(eval_checkpoint):
    """mnli reads `glue/mnli/validation_matched`; hellaswag (no hub config) `hellaswag/default/`."""
    code, stdout, stderr = run_cli(["eval", str(eval_checkpoint), "--tasks", "mnli,hellaswag,cola", "--data-dir",
                                    str(FIXTURES), "--device", "cpu", "--output", "-"])
    assert code == 0, stderr
    results = json.loads(stdout)  # stdout is only the JSON (lm-eval's bootstrap prints go to stderr)
    assert results["n-samples"]["mnli"]["effective"] == 3 and results["n-samples"]["hellaswag"]["effective"] == 2
    assert {"acc,none", "acc_norm,none"} <= set(results["results"]["hellaswag"])
    assert "mnli" in stderr  # the table goes to stderr when the JSON takes stdout


def test_bad_data_files_one_line(eval_checkpoint, tmp_path):
    rte = tmp_path / "glue" / "rte"
    rte.mkdir(parents=True)
    (rte / "validation.jsonl").write_text('{"sentence1": "a b", "label": 0, "idx": 0}\n')
    msg = _one_line_error(["eval", str(eval_checkpoint), "--tasks", "rte", "--data-dir", str(tmp_path)])
    assert f"{rte / 'validation.jsonl'}:1 lacks sentence2" in msg
    (rte / "validation.jsonl").write_text('{"sentence1": "a b", "label": 0,\n')
    msg = _one_line_error(["eval", str(eval_checkpoint), "--tasks", "rte", "--data-dir", str(tmp_path)])
    assert f"{rte / 'validation.jsonl'}:1 is not valid JSON" in msg
    msg = _one_line_error(["eval", str(eval_checkpoint), "--tasks", "rte", "--output", str(tmp_path / "no" / "r.json")])
    assert "does not exist" in msg


@pytest.fixture(scope="module")
def export_dir(eval_checkpoint, tmp_path_factory) -> Path:
    """`chtsl export --format all` of the eval checkpoint (packed safetensors + ONNX)."""
    out = tmp_path_factory.mktemp("export") / "exp"
    code, _, stderr = run_cli(["export", str(eval_checkpoint), "--format", "all", "--out", str(out), "--no-verify"])
    assert code == 0, stderr
    return out


@pytest.mark.parametrize("source,backend", [("ckpt", "sparse"), ("export", "dense"), ("export", "onnx")])
def test_backends_match_reference(eval_checkpoint, export_dir, reference, tmp_path, source, backend):
    """The runtime backends and the packed export score every choice as the reference does."""
    path = eval_checkpoint if source == "ckpt" else export_dir
    code, _, stderr = run_cli(["eval", str(path), "--tasks", "rte,copa", "--data-dir", str(FIXTURES), "--device",
                               "cpu", "--backend", backend, "--output", str(tmp_path / "r.json"), "--log-samples"])
    assert code == 0, stderr
    samples = [json.loads(line) for line in (tmp_path / "r.samples.jsonl").read_text().splitlines()]
    for task in ("rte", "copa"):
        logged = sorted((s for s in samples if s["task"] == task), key=lambda s: s["doc_id"])
        for s, (lls, _) in zip(logged, reference[task], strict=True):
            assert [float(r[0]) for r in s["filtered_resps"]] == pytest.approx(lls, abs=1e-3, rel=1e-5)


@pytest.mark.slow  # a fresh `chtsl eval` process on 277 real examples
@pytest.mark.skipif(not (SHARED_DATA / "glue" / "rte" / "validation.jsonl").is_file(),
                    reason="the shared GLUE RTE validation split is absent")
def test_real_rte_all_277(eval_checkpoint, tmp_path, reference_model_and_tokenizer):
    """All 277 real RTE examples, in a fresh `chtsl` process without any HF_*_OFFLINE variable and
    with sockets refused (the command must go offline by itself: without that, `datasets` looks up
    the hub, and a swallowed failure would pass unnoticed); accuracy equals the reference."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env["OMP_NUM_THREADS"] = "1"  # as the one_thread fixture, for the fresh process
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k):\n"
        "    sys.stderr.write('NETWORK-ATTEMPT\\n')\n"
        "    raise OSError('network disabled in tests')\n"
        "socket.socket.connect = socket.socket.connect_ex = socket.getaddrinfo = refuse\n"
        "from chtsl_infer.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    out = tmp_path / "rte.json"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, "eval", str(eval_checkpoint), "--tasks", "rte", "--data-dir", str(SHARED_DATA),
         "--device", "cpu", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NETWORK-ATTEMPT" not in proc.stderr
    print(f"\nchtsl eval --tasks rte (277 real examples, fresh process): {seconds:.1f} s")
    results = json.loads(out.read_text())
    assert results["n-samples"]["rte"]["effective"] == 277
    model, tok = reference_model_and_tokenizer
    preds, golds = predictions(reference_scores(model, tok, "rte", SHARED_DATA / "glue" / "rte" / "validation.jsonl"))
    expected = sum(p == g for p, g in zip(preds, golds, strict=True)) / len(golds)
    assert results["results"]["rte"]["acc,none"] == pytest.approx(expected, abs=1e-12)



# ----------------------------------------------------------------------------- perplexity


def _train_tiny(root: Path, steps: int) -> Path:
    """A `steps`-step `chtsl train` run of a 1-layer tiny model on a small local corpus, in `root`; its last
    step ran validation. Returns the checkpoint directory."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    (root / "corpus.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)[:60]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHTSL_CACHE_DIR", str(root / "cache"))
        code, _, stderr = run_cli([
            "train", "--preset", "tiny", "--num-layers", "1", "--steps", str(steps), "--batch-size", "4",
            "--micro-batch-size", "2", "--seq-len", "64", "--vocab-size", "512", "--eval-tokens", "3000",
            "--data", str(root / "corpus.txt"), "--device", "cpu", "--no-progress", "--out", str(root / "ckpt"),
        ])
    assert code == 0, stderr
    return root / "ckpt"


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A 3-step run (`_train_tiny`)."""
    return _train_tiny(tmp_path_factory.mktemp("ppl"), 3)


def test_perplexity_equals_trainers_last_validation(trained_checkpoint, tmp_path):
    state = json.loads((trained_checkpoint / "trainer_state" / "state.json").read_text())
    code, stdout, stderr = run_cli(["eval", str(trained_checkpoint), "--perplexity", "--device", "cpu",
                                    "--output", str(tmp_path / "ppl.json")])
    assert code == 0, stderr
    report = json.loads((tmp_path / "ppl.json").read_text())
    assert report["tokens"] == state["last_val"]["val_tokens"]
    assert report["ppl"] == pytest.approx(state["last_val"]["val_ppl"], rel=1e-3)
    assert report["trainer_val_ppl"] == state["last_val"]["val_ppl"]
    assert f"{report['ppl']:.4f}" in stdout

    code, _, stderr = run_cli(["eval", str(trained_checkpoint), "--perplexity", "--device", "cpu",
                               "--max-tokens", "500", "--output", str(tmp_path / "ppl500.json")])
    assert code == 0, stderr
    small = json.loads((tmp_path / "ppl500.json").read_text())
    assert 500 <= small["tokens"] < report["tokens"]
    assert small["trainer_val_ppl"] is None  # other data than the trainer's: nothing to compare


def test_perplexity_does_not_import_the_trainer(trained_checkpoint, tmp_path):
    """`eval --perplexity` reads the run's recorded settings and data without the trainer, its
    topology engine or its checkpoint writer (a fresh interpreter: this one has them imported)."""
    code = f"""
import json, sys
from chtsl_infer.cli import main
try:
    main(["eval", {str(trained_checkpoint)!r}, "--perplexity", "--device", "cpu", "--max-tokens", "300",
          "--output", {str(tmp_path / "ppl.json")!r}])
except SystemExit as e:
    print(json.dumps({{"code": e.code, "modules": sorted(m for m in sys.modules if m.startswith("train."))}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, proc.stderr
    assert json.loads((tmp_path / "ppl.json").read_text())["tokens"] >= 300
    assert "train.data.pipeline" in result["modules"]  # the trainer's data pipeline: the same batches
    assert not {"train.trainer", "train.topology", "train.checkpoint"} & set(result["modules"]), result["modules"]


def test_perplexity_sparse_backend(trained_checkpoint, tmp_path):
    state = json.loads((trained_checkpoint / "trainer_state" / "state.json").read_text())
    code, _, stderr = run_cli(["eval", str(trained_checkpoint), "--perplexity", "--device", "cpu", "--backend",
                               "sparse", "--output", str(tmp_path / "ppl.json")])
    assert code == 0, stderr
    report = json.loads((tmp_path / "ppl.json").read_text())
    assert report["ppl"] == pytest.approx(state["last_val"]["val_ppl"], rel=1e-3)


@pytest.fixture(scope="module")
def longer_trained_checkpoint(tmp_path_factory) -> Path:
    """`trained_checkpoint`'s run for 60 steps: validation perplexity ≈ 180 of 512 tokens (3 steps leave it
    near 504, where rounding the weights moves nothing)."""
    return _train_tiny(tmp_path_factory.mktemp("ppl60"), 60)


@pytest.mark.slow  # trains 60 steps (about a minute on 2 cores)
def test_perplexity_of_int8_and_bf16_weights_within_bounds(longer_trained_checkpoint, tmp_path):
    """The issue's accuracy bound on a tiny trained model: validation perplexity with int8 weights within
    +1.0 % of fp32's, bf16 within +0.1 % — the checkpoint's weights as exports of those dtypes hold them
    (`--dtype`, quantized in memory), on the trainer's data; and an int8 export scores the same through
    the sparse backend (the int8 kernels) as through the dense one (its dequantized weights). (Weights
    quantized to half their values score ≈ 350 here.)"""
    trained_checkpoint = longer_trained_checkpoint
    ppl = {}
    for dtype in ("fp32", "bf16", "int8"):
        out = tmp_path / f"{dtype}.json"
        code, _, stderr = run_cli(["eval", str(trained_checkpoint), "--perplexity", "--device", "cpu", "--dtype",
                                   dtype, "--json", str(out)])
        assert code == 0, stderr
        report = json.loads(out.read_text())
        assert report["weights"] == dtype
        ppl[dtype] = report["ppl"]
    assert ppl["int8"] != ppl["fp32"] and ppl["bf16"] != ppl["fp32"]  # the weights really were rounded
    assert ppl["int8"] <= 1.01 * ppl["fp32"], ppl
    assert ppl["bf16"] <= 1.001 * ppl["fp32"], ppl
    exported = tmp_path / "int8"
    code, _, stderr = run_cli(["export", str(trained_checkpoint), "--format", "safetensors", "--dtype", "int8",
                               "--no-verify", "--out", str(exported)])
    assert code == 0, stderr
    by_backend = {}
    for backend in ("dense", "sparse"):
        out = tmp_path / f"export-{backend}.json"
        code, _, stderr = run_cli(["eval", str(exported), "--perplexity", "--device", "cpu", "--backend", backend,
                                   "--max-tokens", "1000", "--json", str(out)])
        assert code == 0, stderr
        report = json.loads(out.read_text())
        assert report["weights"] == "int8"
        by_backend[backend] = report["ppl"]
    assert by_backend["sparse"] == pytest.approx(by_backend["dense"], rel=1e-4)
    out = tmp_path / "a8.json"  # int8 activations too (the int8 products' inputs): the same bound
    code, _, stderr = run_cli(["eval", str(trained_checkpoint), "--perplexity", "--device", "cpu", "--backend",
                               "sparse", "--dtype", "int8", "--int8-activations", "--json", str(out)])
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert report["int8_activations"] is True and report["ppl"] != ppl["int8"]  # the inputs really were rounded
    assert report["ppl"] <= 1.01 * ppl["fp32"], (report["ppl"], ppl)


def test_perplexity_bad_input(trained_checkpoint, tmp_path):
    msg = _one_line_error(["eval", str(trained_checkpoint), "--perplexity", "--data", str(tmp_path / "missing")])
    assert "missing" in msg
    msg = _one_line_error(["eval", str(trained_checkpoint), "--perplexity", "--int8-activations"])  # fp32, dense
    assert "--int8-activations needs int8 weights" in msg
    msg = _one_line_error(["eval", str(trained_checkpoint), "--perplexity", "--tasks", "rte"])
    assert "--tasks" in msg and "--perplexity" in msg
    msg = _one_line_error(["eval", str(tmp_path), "--perplexity"])
    assert "not a chtsl checkpoint" in msg
