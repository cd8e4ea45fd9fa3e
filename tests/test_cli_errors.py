"""Every malformed input through the `chtsl` CLI: exit 2, one `error:` line, no traceback, no data lost.

One table (`CASES`) of malformed command lines over every command (train, plot, export, bench,
generate, eval, info, sweep), with each command's shared options (chtsl_infer/options.py) and every
renamed spelling (it parses as the new one, so its error names the new one). Each case runs
in-process through `chtsl_infer.cli.main` in a fresh workspace holding copies of the session's
artifacts (a training checkpoint `run`, a second one `run2`, an export `exp`, a corpus, lm-eval
data), optionally damaged by the case's `setup`.
Asserted for each: exit code 2, exactly one non-empty line of output (stdout and stderr at the
file-descriptor level, so library loggers and progress bars count) starting with `error:`, no
`Traceback`, and every file that existed before the command still there with the same sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chtsl_infer.cli import main

FIXTURE_DATA = Path(__file__).parent / "fixtures"

# Arguments that keep an accidental training run tiny (a case that is not refused trains 2 steps).
TRAIN = ("train --data {corpus} --tokenizer bpe --vocab-size 512 --num-layers 2 --seq-len 32 --batch 4 "
         "--micro-batch 4 --steps 2 --warmup 1 --eval-tokens 500 --no-progress --out {ws}/new")
RESUME = "train --resume {run} --no-progress"
RESUME_3 = RESUME + " --steps 3"
PPL = "eval {run} --perplexity --max-tokens 200 --device cpu"
PPL_ONNX = "eval {exp} --perplexity --max-tokens 200 --backend onnx --device cpu"
EXPORT = "export {run} --out {ws}/e2"
EXPORT_ST = EXPORT + " --format safetensors"
GENERATE = "generate {run} --prompt hi --new-tokens 2"
GENERATE_DENSE = GENERATE + " --backend dense"
GENERATE_EXP = "generate {exp} --prompt hi --new-tokens 2"
GENERATE_ONNX = GENERATE_EXP + " --backend onnx"
TASKS = "eval {run} --tasks rte --data-dir {data} --limit 2 --device cpu"
SWEEP = ("sweep --preset tiny --methods naive,chtsl --seeds 0,1 --out {ws}/sw --data {corpus} --vocab-size 512 "
         "--num-layers 2 --seq-len 32 --batch-size 4 --micro-batch-size 4 --steps 2 --warmup 1 --eval-tokens 500")


# ----------------------------------------------------------------------------- damage helpers


def _flip_header(rel: str) -> Callable[[Path], None]:
    """Overwrites the first byte of a safetensors JSON header (its `{`): the header is no JSON."""
    def setup(ws: Path) -> None:
        p = ws / rel
        data = bytearray(p.read_bytes())
        data[8] = 0xFF
        p.write_bytes(bytes(data))
    return setup


def _truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        p = ws / rel
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * keep)])
    return setup


def _pickle(rel: str) -> Callable[[Path], None]:
    """Replaces a file by a pickle (what a planted `.bin` renamed `.safetensors` would be)."""
    def setup(ws: Path) -> None:
        (ws / rel).write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    return setup


def _remove(rel: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        p = ws / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return setup


def _write(rel: str, text: str | bytes) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        p = ws / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def _parquet(rel: str, **columns: list[str]) -> Callable[[Path], None]:
    """A parquet file of string `columns` (e.g. a corpus without a `text` column, or with no rows)."""
    def setup(ws: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()}), ws / rel)
    return setup


def _edit_tensors(rel: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    """Rewrites a safetensors file after `edit(tensors)` (metadata kept)."""
    def setup(ws: Path) -> None:
        p = ws / rel
        with safe_open(str(p), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(p)
        edit(tensors)
        save_file(tensors, p, metadata=metadata)
    return setup


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.pop(key)


def _add_extra(t: dict[str, torch.Tensor]) -> None:
    t["model.layers.0.extra.weight"] = torch.zeros(3)


def _nan(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].clone()
        t[key].view(-1)[0] = float("nan")
    return edit


def _config(rel: str, replace: dict | None = None, **fields) -> Callable[[Path], None]:
    """Replaces `rel` (a config.json) by `replace`, or updates some of its fields."""
    def setup(ws: Path) -> None:
        p = ws / rel
        config = replace if replace is not None else {**json.loads(p.read_text()), **fields}
        p.write_text(json.dumps(config))
    return setup


def _packed_config(**fields) -> Callable[[Path], None]:
    """Changes fields of the config stored in the packed export's safetensors metadata."""
    def setup(ws: Path) -> None:
        p = ws / "exp" / "model.safetensors"
        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata())
        tensors = load_file(p)
        metadata["config"] = json.dumps({**json.loads(metadata["config"]), **fields})
        save_file(tensors, p, metadata=metadata)
    return setup


def _int8_export(edit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Callable[[Path], None]:
    """Rewrites the export as an int8 one (format 2: int8 values and factors with row scales, column
    deltas), then `edit(tensors)` damages it."""
    def setup(ws: Path) -> None:
        from chtsl_infer.formats.model_dir import load_packed, save_packed
        from chtsl_infer.formats.packed import convert_packed

        p = ws / "exp" / "model.safetensors"
        save_packed(convert_packed(load_packed(p), torch.int8), p)
        if edit is not None:
            _edit_tensors("exp/model.safetensors", edit)(ws)
    return setup


def _set_first(key: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].clone()
        t[key].view(-1)[0] = value
    return edit


def _state(**fields) -> Callable[[Path], None]:
    return _config("run/trainer_state/state.json", **fields)


def _task_rows(rows: list[dict]) -> Callable[[Path], None]:
    """An RTE validation split of `rows` in the workspace's lm-eval data directory."""
    return _write("data/glue/rte/validation.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _read_only_dir(ws: Path) -> None:
    d = ws / "ro"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)


# A directory nobody may create entries in: `ro/` (read-only) for a normal user; root ignores
# permissions, so for root the unwritable place is /proc.
READ_ONLY = "{ws}/ro" if os.geteuid() != 0 else "/proc"


def _file(rel: str) -> Callable[[Path], None]:
    return _write(rel, "not a directory\n")


def _both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        for s in setups:
            s(ws)
    return setup


RTE = {"sentence1": "The road was closed.", "sentence2": "The road was open.", "idx": 0}


@dataclass(frozen=True)
class Case:
    """One malformed command line: `argv` is formatted with the workspace's paths ({ws}, {run},
    {run2}, {exp}, {corpus}, {data}); `setup(ws)` damages the copies first; `expect`: a fragment
    the error line must contain (lower case)."""

    id: str
    argv: str
    setup: Callable[[Path], None] | None = None
    expect: str = ""
    memory_cap: bool = False  # run under an address-space cap (a regression would allocate a 7B model)
    env: dict[str, str] | None = None  # environment variables set for the command


def _with_data(rel: str) -> dict[str, str]:
    """`train` and `sweep` command lines reading the corpus `{ws}/REL`."""
    return {cmd: argv.replace("{corpus}", "{ws}/" + rel) for cmd, argv in (("train", TRAIN), ("sweep", SWEEP))}


def _under(commands: dict[str, str], damage: str, setup: Callable[[Path], None], expect: str,
           memory_cap: bool = False) -> list[Case]:
    """One damage under several commands: a case `<prefix>-<damage>` for each `prefix: argv` of `commands`."""
    return [Case(f"{prefix}-{damage}", argv, setup, expect=expect, memory_cap=memory_cap)
            for prefix, argv in commands.items()]


CASES: list[Case] = [
    # ---- train: numbers and choices, refused before anything is built
    Case("train-steps-0", TRAIN + " --steps 0", expect="--steps"),
    Case("train-steps-negative", TRAIN + " --steps -5", expect="--steps"),
    Case("train-steps-not-int", TRAIN + " --steps abc", expect="--steps"),
    Case("train-unknown-option", TRAIN + " --stepz 3", expect="--stepz"),
    Case("train-batch-0", TRAIN + " --batch 0", expect="--batch must"),
    Case("train-batch-size-0", TRAIN + " --batch-size 0", expect="--batch must"),  # old spelling: the new name
    Case("train-micro-batch-0", TRAIN + " --micro-batch 0", expect="--micro-batch must"),
    Case("train-micro-batch-size-0", TRAIN + " --micro-batch-size 0", expect="--micro-batch must"),
    Case("train-batch-not-int", TRAIN + " --batch-size four", expect="--batch"),
    Case("train-seq-len-0", TRAIN + " --seq-len 0", expect="--seq-len"),
    Case("train-eval-every-0", TRAIN + " --eval-every 0", expect="--eval-every"),
    Case("train-save-every-negative", TRAIN + " --save-every -1", expect="--save-every"),
    Case("train-ocr-every-negative", TRAIN + " --ocr-every -1", expect="--ocr-every"),
    Case("train-eval-tokens-negative", TRAIN + " --eval-tokens -5", expect="--eval-tokens"),
    Case("train-vocab-size-0", TRAIN + " --vocab-size 0", expect="--vocab-size"),
    Case("train-vocab-size-10", TRAIN + " --vocab-size 10", expect="--vocab-size"),
    Case("train-num-layers-0", TRAIN + " --num-layers 0", expect="--num-layers"),
    Case("train-num-layers-negative", TRAIN + " --num-layers -1", expect="--num-layers"),
    Case("train-update-interval-negative", TRAIN + " --update-interval -1", expect="--update-interval"),
    Case("train-restart-warmup-negative", TRAIN + " --restart-warmup -3", expect="--restart-warmup"),
    Case("train-restart-warmup-not-shorter", TRAIN + " --restart-warmup 5 --update-interval 5",
         expect="--restart-warmup (5) must be shorter than --update-interval (5)"),
    Case("train-warmup-negative", TRAIN + " --warmup -1", expect="--warmup"),
    Case("train-lr-nan", TRAIN + " --lr nan", expect="--lr"),
    Case("train-lr-inf", TRAIN + " --lr inf", expect="--lr"),
    Case("train-lr-negative", TRAIN + " --lr -0.1", expect="--lr"),
    Case("train-grad-clip-nan", TRAIN + " --grad-clip nan", expect="--grad-clip"),
    Case("train-align-lambda-nan", TRAIN + " --align-lambda nan", expect="--align-lambda"),
    Case("train-align-lambda-inf", TRAIN + " --align-lambda inf", expect="--align-lambda"),
    Case("train-activation-unknown", TRAIN + " --activation swish", expect="unknown activation 'swish'"),
    Case("train-sparsity-one", TRAIN + " --sparsity 1.0", expect="--sparsity"),
    Case("train-rank-zero", TRAIN + " --rank 0", expect="--rank"),
    Case("train-brf-randomness-above-one", TRAIN + " --brf-randomness 2", expect="--brf-randomness"),
    Case("train-lowrank-lr-scale-zero", TRAIN + " --lowrank-lr-scale 0", expect="--lowrank-lr-scale"),
    Case("train-lowrank-init-scale-nan", TRAIN + " --lowrank-init-scale nan", expect="--lowrank-init-scale"),
    Case("train-s-total-2", TRAIN + " --s-total 2"),
    Case("train-device-tpu", TRAIN + " --device tpu", expect="--device 'tpu'"),
    Case("train-dtype-fp64", TRAIN + " --dtype fp64", expect="fp64"),
    Case("train-preset-unknown", TRAIN + " --preset nope", expect="nope"),
    Case("train-method-unknown", TRAIN + " --method nope", expect="nope"),
    Case("train-stop-at-0", TRAIN + " --stop-at 0", expect="--stop-at"),
    Case("train-data-missing", TRAIN + " --data {ws}/nothing.jsonl", expect="nothing.jsonl"),
    # ---- train: values that leave what a run can hold (issue 28)
    Case("train-sparsity-below-brf", TRAIN + " --sparsity 0.9999999", expect="too few links for brf"),
    Case("train-chts-sparsity-below-brf", TRAIN + " --method chts --sparsity 0.995", expect="q_proj 82 < 128"),
    Case("train-rank-beyond-dense", TRAIN + " --rank 100000", expect="more than the dense model's"),
    Case("train-warmup-beyond-steps", TRAIN + " --warmup 100", expect="--warmup 100 is longer than the run"),
    Case("train-seed-huge", TRAIN + " --seed 18446744073709551617", expect="--seed must be in [0, 4294967295]"),
    Case("train-seed-negative", TRAIN + " --seed -1", expect="--seed"),
    Case("train-seq-len-beyond-rope", TRAIN + " --seq-len 100000", expect="--seq-len 100000 exceeds the 35,"),
    Case("train-out-empty", TRAIN + " --out=", expect="--out must not be empty"),
    Case("train-resume-empty", TRAIN + " --resume=", expect="--resume must not be empty"),
    Case("train-data-empty", TRAIN + " --data=", expect="--data must not be empty"),
    Case("train-activation-empty", TRAIN + " --activation=", expect="--activation must not be empty"),
    Case("train-tokenizer-blank", TRAIN + " --tokenizer= ", expect="--tokenizer must not be empty"),
    Case("train-data-device", TRAIN + " --data /dev/zero", expect="/dev/zero is a character device"),
    Case("train-data-fifo", TRAIN + " --data {ws}/fifo", lambda ws: os.mkfifo(ws / "fifo"),
         expect="is a fifo (named pipe)"),
    # ---- train: outputs
    Case("train-out-is-file", TRAIN + " --out {ws}/afile", _file("afile"), expect="afile"),
    Case("train-out-read-only", TRAIN + f" --out {READ_ONLY}/sub", _read_only_dir, expect="--out"),
    Case("train-out-holds-checkpoint", TRAIN + " --out {run2}", expect="already holds a checkpoint"),
    Case("train-json-is-dir", TRAIN + " --json {ws}", expect="--json"),
    Case("train-json-onto-checkpoint-file", TRAIN + " --json {run2}/config.json", expect="--json"),
    Case("train-json-existing-file", TRAIN + " --json {ws}/afile", _file("afile"), expect="--force"),
    # ---- train --resume: other outputs and damaged checkpoints
    Case("resume-out-holds-other-checkpoint", RESUME + " --steps 3 --out {run2}", expect="already holds"),
    Case("resume-already-done", RESUME, expect="already"),
    Case("resume-model-missing-tensor", RESUME_3,
         _edit_tensors("run/model.safetensors", _drop("lm_head.weight")), expect="lm_head.weight"),
    Case("resume-optimizer-pickle", RESUME_3, _pickle("run/trainer_state/optimizer.safetensors"),
         expect="optimizer.safetensors"),
    Case("resume-optimizer-truncated", RESUME_3, _truncate("run/trainer_state/optimizer.safetensors"),
         expect="optimizer.safetensors"),
    Case("resume-topology-missing", RESUME_3, _remove("run/trainer_state/topology.safetensors"),
         expect="topology.safetensors"),
    Case("resume-topology-header-flipped", RESUME_3,
         _flip_header("run/trainer_state/topology.safetensors"), expect="topology.safetensors"),
    Case("resume-rng-truncated", RESUME_3, _truncate("run/trainer_state/rng.safetensors"),
         expect="rng.safetensors"),
    Case("resume-rng-missing", RESUME_3, _remove("run/trainer_state/rng.safetensors"),
         expect="rng.safetensors"),
    Case("resume-state-step-string", RESUME_3, _state(step="x"), expect="step"),
    Case("resume-state-json-garbage", RESUME_3, _write("run/trainer_state/state.json", "{oops"),
         expect="state.json"),
    Case("resume-args-missing", RESUME_3, _remove("run/trainer_state/args.json"), expect="args.json"),
    Case("resume-config-garbage", RESUME_3, _write("run/config.json", "{oops"), expect="config.json"),
    Case("resume-not-a-checkpoint", "train --resume {ws}/nothing --no-progress", expect="nothing"),
    # ---- plot
    Case("plot-no-metrics", "plot {ws}/nothing", expect="nothing"),
    Case("plot-out-is-file", "plot {run} --out {ws}/afile", _file("afile"), expect="afile"),
    Case("plot-out-read-only", "plot {run} --out " + READ_ONLY + "/sub", _read_only_dir, expect="--out"),
    Case("plot-metrics-garbage", "plot {run}", _write("run/metrics.jsonl", "{oops\n"), expect="metrics.jsonl"),
    Case("plot-json-onto-config", "plot {run} --out {ws}/p --json {run}/config.json", expect="--json"),
    Case("plot-json-existing-file", "plot {run} --out {ws}/p --json {ws}/afile", _file("afile"), expect="--force"),
    Case("plot-json-is-dir", "plot {run} --out {ws}/p --json {ws}", expect="directory"),
    # ---- export
    Case("export-out-into-trainer-state", "export {run} --out {run}/trainer_state --force", expect="--force"),
    Case("export-force-onto-checkpoint", "export {run} --out {run2} --force", expect="--force"),
    Case("export-force-onto-other-dir", "export {run} --out {ws}/other --force",
         _write("other/notes.txt", "mine\n"), expect="--force"),
    Case("export-out-exists", "export {run} --out {exp}", expect="--force"),
    Case("export-out-is-file", "export {run} --out {ws}/afile --force", _file("afile"), expect="afile"),
    Case("export-json-onto-config", EXPORT + " --json {run}/config.json", expect="--json"),
    Case("export-opset-99", EXPORT + " --format onnx --opset 99 --no-verify", expect="opset"),
    Case("export-opset-low", EXPORT + " --opset 7", expect="opset"),
    Case("export-format-unknown", EXPORT + " --format gguf", expect="gguf"),
    Case("export-dtype-unknown", EXPORT + " --dtype int4", expect="int4"),
    Case("export-onnx-int8", EXPORT + " --format onnx --dtype int8", expect="the onnx graph stays float32"),
    Case("export-index-unknown", EXPORT_ST + " --index delta4", expect="delta4"),
    Case("export-index-onnx", EXPORT + " --format onnx --index delta8", expect="--index"),
    Case("export-verify-device-tpu", EXPORT + " --verify-device tpu", expect="--verify-device 'tpu'"),
    Case("export-device-old-spelling", EXPORT + " --device tpu", expect="--verify-device 'tpu'"),
    Case("export-verify-device-no-verify", EXPORT + " --verify-device cpu --no-verify", expect="--verify-device"),
    Case("export-json-existing-file", EXPORT + " --json {ws}/afile", _file("afile"), expect="--force"),
    Case("export-config-heads-0", EXPORT_ST,
         _config("run/config.json", num_attention_heads=0), expect="num_attention_heads"),
    Case("export-config-hidden-negative", EXPORT_ST,
         _config("run/config.json", hidden_size=-128), expect="hidden_size"),
    Case("export-config-vs-weights", EXPORT_ST,
         _config("run/config.json", vocab_size=100000), expect="implies (100000, 128)"),
    Case("export-config-layers-vs-weights", EXPORT_ST,
         _config("run/config.json", num_hidden_layers=6), expect="model.layers.2"),
    Case("export-unexpected-tensor", EXPORT_ST,
         _edit_tensors("run/model.safetensors", _add_extra), expect="model.layers.0.extra.weight"),
    Case("export-nan-weight", EXPORT_ST,
         _edit_tensors("run/model.safetensors", _nan("model.embed_tokens.weight")), expect="non-finite"),
    # ---- generate
    Case("generate-temperature-nan", "generate {run} --prompt hi --temperature nan", expect="--temperature"),
    Case("generate-temperature-inf", "generate {run} --prompt hi --temperature inf", expect="--temperature"),
    Case("generate-temperature-negative", "generate {run} --prompt hi --temperature -1", expect="--temperature"),
    Case("generate-new-tokens-0", "generate {run} --prompt hi --new-tokens 0", expect="--new-tokens must"),
    Case("generate-max-new-0", "generate {run} --prompt hi --max-new-tokens 0", expect="--new-tokens must"),
    Case("generate-new-tokens-beyond-positions", "generate {run} --prompt hi --max-new-tokens 100000",
         expect="--new-tokens 100000"),
    Case("generate-device-tpu", "generate {run} --prompt hi --device tpu", expect="--device 'tpu'"),
    Case("generate-json-onto-config", GENERATE + " --json {run}/config.json", expect="--json"),
    Case("generate-json-existing-file", GENERATE + " --json {ws}/afile", _file("afile"), expect="--force"),
    Case("generate-no-ckpt", "generate --prompt hi", expect="ckpt"),
    Case("generate-no-prompt", "generate {run}", expect="--prompt"),
    Case("generate-dtype-unknown", "generate {run} --prompt hi --dtype int4", expect="int4"),
    Case("generate-seed-huge", "generate {run} --prompt hi --seed 18446744073709551617", expect="--seed"),
    Case("generate-seed-negative", "generate {run} --prompt hi --seed -3", expect="--seed"),
    # a prompt that is not UTF-8 reaches Python with its bad byte as a lone surrogate (PEP 383)
    Case("generate-prompt-not-utf8", "generate {run} --prompt caf\udce9", expect="--prompt is not valid utf-8"),
    Case("generate-dtype-fp16-sparse", "generate {run} --prompt hi --backend sparse --dtype fp16",
         expect="float32 or bfloat16"),
    Case("generate-onnx-bf16", GENERATE_EXP + " --backend onnx --dtype bf16", expect="--dtype fp32"),
    Case("generate-nan-weight", GENERATE_DENSE,
         _edit_tensors("run/model.safetensors", _nan("lm_head.weight")), expect="non-finite"),
    Case("generate-onnx-empty", GENERATE_ONNX, _write("exp/model.onnx", b""), expect="model.onnx"),
    # an int8 export whose scales or column deltas disagree with its values (validated before any kernel)
    *_under({"generate-int8": GENERATE_EXP + " --backend sparse", "eval-int8": "eval {exp} --perplexity "
             "--max-tokens 200 --device cpu --backend sparse"}, "scale-missing",
            _int8_export(_drop("model.layers.0.self_attn.q_proj.values_scale")), expect="values_scale"),
    *_under({"generate-int8": GENERATE_EXP, "bench-int8": "bench {exp} --device cpu --dtype int8"}, "nan-scale",
            _int8_export(_nan("model.layers.1.mlp.down_proj.lora_B_scale")), expect="non-finite"),
    Case("generate-int8-zero-scale", GENERATE_EXP, _int8_export(_set_first("lm_head.weight_scale", 0.0)),
         expect="scales must be finite and > 0"),
    Case("generate-int8-short-scale", GENERATE_EXP, _int8_export(lambda t: t.update(
        {"model.layers.0.mlp.up_proj.values_scale": t["model.layers.0.mlp.up_proj.values_scale"][:-1].clone()})),
         expect="values_scale must be float32 of shape"),
    Case("generate-int8-column-past-the-row", GENERATE_EXP,
         _int8_export(_set_first("model.layers.0.self_attn.k_proj.col_delta", 255)), expect="past in_features"),
    Case("generate-int8-truncated", GENERATE_EXP, _both(_int8_export(), _truncate("exp/model.safetensors")),
         expect="model.safetensors"),
    Case("generate-onnx-int8", GENERATE + " --dtype int8 --device cpu --backend onnx",
         expect="--dtype fp32"),
    # --int8-activations needs int8 weights on the CPU sparse backend
    Case("generate-int8-activations-fp32", GENERATE + " --device cpu --int8-activations",
         expect="--int8-activations needs int8 weights"),
    Case("bench-int8-activations-dense", "bench {run} --device cpu --dtype int8 --backend dense --int8-activations",
         expect="--int8-activations needs int8 weights"),
    Case("eval-int8-activations-dense-backend", "eval {run} --perplexity --device cpu --dtype int8 --int8-activations",
         expect="--int8-activations needs int8 weights"),
    Case("generate-packed-heads-0", GENERATE_EXP + " --backend sparse",
         _packed_config(num_attention_heads=0), expect="num_attention_heads"),
    Case("generate-packed-hidden-negative", GENERATE_EXP + " --backend dense",
         _packed_config(hidden_size=-128), expect="hidden_size"),
    Case("generate-packed-nan", GENERATE_EXP + " --backend dense",
         _edit_tensors("exp/model.safetensors", _nan("lm_head.weight")), expect="non-finite"),
    # ---- eval
    Case("eval-json-onto-config", PPL + " --json {run}/config.json", expect="config.json"),
    Case("eval-json-onto-weights", PPL + " --json {exp}/model.safetensors", expect="model.safetensors"),
    Case("eval-json-existing-file", PPL + " --json {ws}/afile", _file("afile"), expect="--force"),
    Case("eval-json-is-dir", PPL + " --json {ws}", expect="directory"),
    Case("eval-output-onto-config", PPL + " --output {run}/config.json", expect="--json"),  # the old spelling
    Case("eval-output-existing-file", PPL + " --output {ws}/afile", _file("afile"), expect="--force"),
    Case("eval-device-tpu", PPL.replace("--device cpu", "--device tpu"), expect="--device 'tpu'"),
    Case("eval-dtype-unknown", PPL + " --dtype int4", expect="int4"),
    Case("eval-no-ckpt", "eval --perplexity --device cpu", expect="missing ckpt"),
    Case("eval-task-unknown", "eval {run} --tasks nope --device cpu", expect="nope"),
    Case("eval-batch-0", TASKS + " --batch 0", expect="--batch must"),
    Case("eval-batch-size-0", TASKS + " --batch-size 0", expect="--batch must"),  # old spelling: the new name
    Case("eval-label-out-of-range", TASKS, _task_rows([{**RTE, "label": 7}]), expect="label"),
    Case("eval-label-string", TASKS, _task_rows([{**RTE, "label": "yes"}]), expect="label"),
    Case("eval-sentence-null", TASKS, _task_rows([{**RTE, "label": 0, "sentence1": None}]), expect="sentence1"),
    Case("eval-neither-mode", "eval {run}", expect="--tasks"),
    # ---- bench (refused before any worker is spawned)
    Case("bench-timeout-nan", "bench --preset tiny --timeout nan", expect="--timeout"),
    Case("bench-timeout-negative", "bench --preset tiny --timeout -1", expect="--timeout"),
    Case("bench-batch-0", "bench --preset tiny --batch 0", expect="--batch"),
    Case("bench-seq-beyond-positions", "bench {run} --seq 100000 --device cpu", expect="--seq"),
    Case("bench-json-onto-config", "bench --preset tiny --json {run}/config.json", expect="--json"),
    Case("bench-device-tpu", "bench --preset tiny --device tpu", expect="--device 'tpu'"),
    Case("bench-dtype-unknown", "bench --preset tiny --dtype int4", expect="int4"),
    Case("bench-new-tokens-0", "bench --preset tiny --mode decode --new-tokens 0", expect="--new-tokens"),
    Case("bench-json-existing-file", "bench --preset tiny --json {ws}/afile", _file("afile"), expect="--force"),
    Case("bench-backend-unknown", "bench --preset tiny --backend gpu9", expect="gpu9"),
    Case("bench-dense-path-unknown", "bench --preset tiny --dense-path mkl", expect="unknown --dense-path 'mkl'"),
    Case("bench-dense-path-gemv-batch-8", "bench --preset tiny --mode decode --batch 8 --dense-path gemv --device cpu",
         expect="--dense-path gemv multiplies 1-4 tokens per step"),
    Case("bench-dense-path-gemv-forward", "bench --preset tiny --batch 1 --seq 8 --dense-path gemv --device cpu",
         expect="this run has 8 on cpu"),
    # ---- info
    Case("info-preset-unknown", "info --preset nope", expect="nope"),
    Case("info-method-unknown", "info --method nope", expect="nope"),
    Case("info-rank-negative", "info --rank -1", expect="rank"),
    Case("info-sparsity-1", "info --sparsity 1.5", expect="sparsity"),
    Case("info-s-total-nan", "info --s-total nan", expect="s_total"),
    Case("info-json-onto-config", "info --json {run}/config.json", expect="--json"),
    Case("info-json-existing-file", "info --json {ws}/afile", _file("afile"), expect="--force"),
    Case("info-kernels-with-preset", "info --kernels --preset tiny", expect="--preset"),
    Case("info-retune-with-rank", "info --retune --rank 4 --s-total 0.8", expect="--s-total, --rank"),
    Case("info-retune-tuning-off", "info --retune", expect="CHTSL_TUNE=0"),  # the suite's CHTSL_TUNE=0
    Case("info-kernels-tune-env-bad", "info --kernels", expect="CHTSL_TUNE", env={"CHTSL_TUNE": "maybe"}),
    Case("info-retune-budget-bad", "info --retune", expect="CHTSL_TUNE_BUDGET",
         env={"CHTSL_TUNE": "1", "CHTSL_TUNE_BUDGET": "-3"}),
    Case("info-kernels-json-existing-file", "info --kernels --json {ws}/afile", _file("afile"), expect="--force"),
    # ---- sweep (refused before any run or print)
    Case("sweep-no-out", "sweep --preset tiny", expect="--out"),
    Case("sweep-alternative-unknown", "sweep --out {ws}/sw --alternative both", expect="--alternative"),
    Case("sweep-json-onto-config", "sweep --out {ws}/sw --print-commands --json {run}/config.json", expect="--json"),
    Case("sweep-json-existing-file", "sweep --out {ws}/sw --print-commands --json {ws}/afile", _file("afile"),
         expect="--force"),
    Case("sweep-report-json-is-dir", "sweep --report {ws}/nothing --json {ws}", expect="directory"),
    Case("sweep-forwarded-unknown", "sweep --out {ws}/sw --print-commands --stepz 3", expect="--stepz"),
    Case("no-such-command", "trian --steps 3", expect="trian"),
    # ---- sweep: the grid and its jobs, refused before anything is written
    Case("sweep-jobs-0", SWEEP + " --jobs 0", expect="--jobs must be >= 1"),
    Case("sweep-jobs-negative", SWEEP + " --jobs -2", expect="--jobs must be >= 1"),
    Case("sweep-jobs-more-than-cells", SWEEP + " --jobs 5", expect="more than the grid's 4 cells"),
    Case("sweep-report-with-jobs", "sweep --report {ws} --jobs 2", expect="--jobs"),
    # ---- a local corpus that no run can train on, for one run and for a sweep
    *_under(_with_data("c.parquet"), "data-no-text-column", _parquet("c.parquet", body=["some text", "more"]),
            "no `text` column"),
    *_under(_with_data("c.parquet"), "data-empty-parquet", _parquet("c.parquet", text=[]), "empty"),
    *_under(_with_data("c.parquet"), "data-unreadable-parquet", _write("c.parquet", b"PAR1 not parquet"),
            "cannot read"),
    *_under(_with_data("c.txt"), "data-empty-text", _write("c.txt", "\n\n  \n"), "empty"),
    *_under(_with_data("c.jsonl"), "data-jsonl-no-text", _write("c.jsonl", '{"body": "x"}\n'), "`text` field"),
    # ---- the same damage under several commands
    *_under({"resume-model": RESUME_3, "export": EXPORT, "generate": GENERATE, "eval-ppl": PPL},
            "header-flipped", _flip_header("run/model.safetensors"), "model.safetensors"),
    *_under({"resume-model": RESUME_3, "generate": GENERATE_DENSE, "eval-ppl": PPL},
            "truncated", _truncate("run/model.safetensors"), "model.safetensors"),
    *_under({"resume-model": RESUME_3, "export-weights": EXPORT, "generate": GENERATE_DENSE},
            "pickle", _pickle("run/model.safetensors"), "model.safetensors"),
    *_under({"export": EXPORT_ST, "generate": GENERATE_DENSE},
            "missing-lm-head", _edit_tensors("run/model.safetensors", _drop("lm_head.weight")), "lm_head.weight"),
    *_under({"export": EXPORT_ST, "generate": GENERATE_DENSE, "bench": "bench {run} --device cpu"},
            "config-only-model-type", _config("run/config.json", replace={"model_type": "chtsl_llama"}),
            "config.json", memory_cap=True),
    *_under({"generate-onnx": GENERATE_ONNX, "eval-ppl-onnx": PPL_ONNX},
            "truncated", _truncate("exp/model.onnx"), "model.onnx"),
    *_under({"generate-onnx": GENERATE_ONNX, "eval-ppl-onnx": PPL_ONNX},
            "garbage", _write("exp/model.onnx", b"\x00garbage" * 50), "model.onnx"),
    *_under({"generate-onnx": GENERATE_ONNX, "eval-ppl-onnx": PPL_ONNX},
            "bad-config", _write("exp/config.json", "{oops"), "config.json"),
]


def _sha256_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def workspace(tmp_path, cli_artifacts, monkeypatch) -> Path:
    """A directory with copies of the artifacts (`run`, `run2`, `exp`, corpus, lm-eval data)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(cli_artifacts["run"], ws / "run")
    shutil.copytree(cli_artifacts["run"], ws / "run2")
    shutil.copytree(cli_artifacts["export"], ws / "exp")
    shutil.copy(cli_artifacts["corpus"], ws / "corpus.jsonl")
    shutil.copytree(FIXTURE_DATA, ws / "data")
    monkeypatch.setenv("CHTSL_CACHE_DIR", str(cli_artifacts["cache"]))
    monkeypatch.chdir(ws)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ws
    torch.set_num_threads(n)
    for p in ws.rglob("*"):  # let pytest clean up read-only directories
        if p.is_dir() and not p.is_symlink():
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


@contextmanager
def address_space_cap(extra_bytes: int = 4 << 30) -> Iterator[None]:
    """Caps this process's (and its children's) address space at its current size + `extra_bytes`,
    so a regression that builds a 7B model fails with MemoryError instead of waking the OOM killer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    size = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    cap = size + extra_bytes if hard == resource.RLIM_INFINITY else min(size + extra_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_cli(argv: list[str], capfd) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `chtsl ARGV` in this process, captured at the fd level."""
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capfd.readouterr()
    return code, out + err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input(case: Case, workspace: Path, capfd, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = workspace
    for name, value in (case.env or {}).items():
        monkeypatch.setenv(name, value)
    paths = {"ws": ws, "run": ws / "run", "run2": ws / "run2", "exp": ws / "exp", "corpus": ws / "corpus.jsonl",
             "data": ws / "data"}
    if case.setup is not None:
        case.setup(ws)
    before = _sha256_tree(ws)
    capfd.readouterr()
    with address_space_cap() if case.memory_cap else nullcontext():
        code, output = run_cli(case.argv.format(**paths).split(), capfd)
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output, output
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert case.expect.lower() in lines[0].lower(), lines[0]
    after = _sha256_tree(ws)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"files changed or removed: {changed}"


def test_table_size() -> None:
    """The issue asks for at least 60 malformed inputs, over every command."""
    assert len(CASES) >= 60
    commands = {c.argv.split()[0] for c in CASES}
    assert {"train", "plot", "export", "bench", "generate", "eval", "info", "sweep"} <= commands
