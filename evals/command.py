"""`chtsl eval`: zero-shot GLUE/SuperGLUE through lm-eval, or the trainer's validation perplexity.

    chtsl eval ckpt/ --tasks rte,copa [--data-dir DIR] [--json res.json --log-samples]
    chtsl eval ckpt/ --perplexity [--data builtin|c4|owt|PATH] [--max-tokens N]
    chtsl eval --list-tasks

Heavy imports (torch, transformers, datasets, lm_eval) stay inside the functions: `chtsl --help`
stays fast, and with `--data-dir` the offline switches are set before `datasets`/`lm_eval` load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from chtsl_infer.console import check_output_file, console, err_console, write_json
from chtsl_infer.errors import ChtslError
from chtsl_infer.formats.model_dir import load_model, load_tokenizer, read_trainer_state, resolve_model_dir
from chtsl_infer.options import Batch, Device, Dtype, Force, Int8Activations, JsonOut, OptionalCheckpoint
from chtsl_infer.utils import PACKED_DTYPES, inference_dtype, parse_dtype, resolve_device, torch_dtype

BACKENDS = ("dense", "sparse", "onnx", "auto")  # dense: the checkpoint's model; others: chtsl_infer.runtime.backends


def _progress():  # -> rich.progress.Progress
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,  # a failure leaves one error line
    )


def _load(model_dir, backend: str, device: str, dtype: str, weights: str | None = None,
          int8_activations: bool = False):
    """(causal LM module on `device`, eval mode; tokenizer) of a checkpoint or packed export
    (`model_dir`, a `ModelDir`), computing in `dtype` ("int8": int8 weights, fp32 activations).
    `weights`: a packed dtype the weights are first rounded to, as an export of it would hold them
    ("bf16", "int8"; None: as stored).

    `dense` is the checkpoint's own model (`load_model`: the trainer's computation, the reference;
    int8 weights dequantized); the other backends come from `chtsl_infer.runtime.backends` and score
    through `Runtime.logits` — the same forward as `chtsl bench` (feature-major for the torch
    backends, no transposes around the sparse kernel; matches transformers' forward within 1e-4).
    `int8_activations`: see `backends.from_packed` (int8 weights on the CPU sparse backend).
    """
    if int8_activations:
        from chtsl_infer.runtime.backends import check_int8_activations

        check_int8_activations(backend, device, dtype)
    tokenizer = load_tokenizer(model_dir)
    weights = "int8" if dtype == "int8" else weights
    if backend == "dense":
        from chtsl_infer.formats.packed import as_exported

        model = load_model(model_dir, device="cpu")
        if weights is not None:
            model = as_exported(model, torch_dtype(weights))
        return model.to(device, torch_dtype("fp32" if dtype == "int8" else dtype)), tokenizer
    from chtsl_infer.runtime.backends import from_packed, load_packed_any, load_runtime
    from evals.harness import RuntimeModule

    if weights is None or backend == "onnx":
        runtime = load_runtime(model_dir, backend=backend, device=device, dtype=torch_dtype(dtype),
                               int8_activations=int8_activations)
    else:
        from chtsl_infer.formats.packed import convert_packed

        packed = convert_packed(load_packed_any(model_dir), torch_dtype(weights))
        runtime = from_packed(packed, backend, device, torch_dtype(dtype), consume=True,
                              int8_activations=int8_activations)
    return RuntimeModule(runtime), tokenizer


def run_tasks(ckpt: Path, tasks: str, *, data_dir: Path | None, batch_size: int, limit: int | None, device: str,
              dtype: str, backend: str, output: Path | None, log_samples: bool, force: bool = False,
              int8_activations: bool = False) -> dict[str, Any]:
    """Runs lm-eval on `tasks` and prints the results table; returns lm-eval's results dict."""
    if data_dir is not None:
        if not data_dir.is_dir():
            raise ChtslError(f"--data-dir {data_dir} is not a directory")
        from evals.harness import enable_offline

        enable_offline()  # before datasets / lm_eval are imported: they read it at import
    from evals import harness

    names, notes = harness.resolve_tasks(tasks)
    model_dir = resolve_model_dir(ckpt).require_weights()
    if data_dir is not None:  # find and check every file before the (slow) model load and lm-eval run
        harness.task_configs(names, data_dir)
    device = resolve_device(device)
    model, tokenizer = _load(model_dir, backend, device, inference_dtype(dtype, device, model_dir.packed_dtype),
                             int8_activations=int8_activations)
    for note in notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    with harness.quiet_lm_eval(), _progress() as progress:
        results = harness.evaluate(model, tokenizer, names, data_dir=data_dir, batch_size=batch_size, limit=limit,
                                   log_samples=log_samples, progress=progress)
    rows = harness.metric_rows(results)
    table = harness.results_table(rows, f"{ckpt} · zero-shot · lm-eval {results.get('lm_eval_version', '')}")
    (err_console if str(output) == "-" else console).print(table)  # stdout is the JSON's with --json -
    if output is not None:
        for path in harness.write_results(results, output, log_samples, force):
            err_console.print(f"wrote {path}", highlight=False)
    return results


def validation_spec(model_dir, config, *, data: str | None, max_tokens: int | None):
    """(DataSpec, eval batch size, trainer's last validation record or None) for `model_dir`.

    A training checkpoint's `trainer_state/args.json` gives the trainer's data, sequence length,
    packing, eval tokens and micro-batch, so the default reproduces its validation perplexity;
    `data` / `max_tokens` override. Other checkpoints use `DataSpec`'s defaults (builtin corpus),
    the sequence length capped at the model's positions.
    """
    from train.data.pipeline import DataSpec, spec_from_args

    spec = DataSpec()
    eval_batch, last_val = 16, None
    if model_dir.is_training_checkpoint:
        state, args = read_trainer_state(model_dir.path)
        spec = spec_from_args(args)
        eval_batch = int(args.get("micro_batch_size") or eval_batch)
        last_val = state.get("last_val")
    else:  # the checkpoint's own tokenizer, its embedding size
        spec = DataSpec(tokenizer="checkpoint", vocab_size=config.vocab_size,
                        seq_len=min(spec.seq_len, config.max_position_embeddings))
    if (data is not None and data != spec.data) or (max_tokens is not None and max_tokens != spec.eval_tokens):
        last_val = None  # the trainer's number is for other data: nothing to compare with
    if data is not None:
        spec.data = data
    if max_tokens is not None:
        spec.eval_tokens = max_tokens
    return spec, eval_batch, last_val


def run_perplexity(ckpt: Path, *, data: str | None, max_tokens: int | None, device: str, backend: str,
                   output: Path | None, force: bool = False, weights: str | None = None,
                   int8_activations: bool = False) -> dict[str, Any]:
    """Validation perplexity as the trainer computes it (same data, tokenization, batches, function), in
    fp32; `weights` ("bf16", "int8", …): first rounded to that packed dtype (None: as stored; an int8
    export runs int8 weights through the runtime backends); `int8_activations`: see `_load`."""
    from chtsl_infer.model.loss import perplexity
    from train.data.pipeline import validation_batches

    device = resolve_device(device)
    model_dir = resolve_model_dir(ckpt).require_weights()
    stored = "int8" if model_dir.packed_dtype == "int8" and weights is None else weights
    int8_kernels = stored == "int8" and backend != "dense" and device == "cpu"
    model, tokenizer = _load(model_dir, backend, device, "int8" if int8_kernels or int8_activations and stored == "int8"
                             else "fp32", weights, int8_activations)
    spec, eval_batch, last_val = validation_spec(model_dir, model.config, data=data, max_tokens=max_tokens)
    with err_console.status(f"tokenizing validation data ({spec.data})"):
        batches, _ = validation_batches(spec, tokenizer, eval_batch=eval_batch)
    with _progress() as progress:
        bar = progress.add_task("perplexity", total=len(batches))

        def tracked():
            for b in batches:
                yield b
                progress.advance(bar)

        result = perplexity(model, tracked(), device)
    report: dict[str, Any] = {
        "checkpoint": str(ckpt), "weights": weights or parse_dtype(model_dir.packed_dtype or "fp32", PACKED_DTYPES),
        "int8_activations": int8_activations,
        "data": spec.data, "seq_len": spec.seq_len, "packing": spec.packing,
        "max_tokens": spec.eval_tokens, "tokens": result.tokens, "nll": result.nll, "ppl": result.ppl,
        "trainer_val_ppl": (last_val or {}).get("val_ppl"),
    }
    from rich.table import Table

    table = Table(title=f"{ckpt} · validation perplexity · {report['weights']} weights"
                        f"{' · int8 activations' if int8_activations else ''}")
    for col in ("data", "seq len", "tokens", "nll (nats/token)", "ppl", "trainer's last val ppl"):
        table.add_column(col, justify="left" if col == "data" else "right")
    trainer_ppl = report["trainer_val_ppl"]
    table.add_row(spec.data, str(spec.seq_len), f"{result.tokens:,}", f"{result.nll:.4f}", f"{result.ppl:.4f}",
                  "—" if trainer_ppl is None else f"{trainer_ppl:.4f}")
    (err_console if str(output) == "-" else console).print(table)  # stdout is the JSON's with --json -
    write_json(report, output, force, "--json")
    return report


def eval_command(
    ckpt: OptionalCheckpoint = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="Comma-separated lm-eval task or group names.")] = None,
    list_tasks: Annotated[bool, typer.Option("--list-tasks", help="Print the supported task and group names.")] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Offline data: DIR/<dataset>/<config>/<split>.jsonl (or .parquet)."),
    ] = None,
    batch: Batch = 8,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N examples per task.")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    int8_activations: Int8Activations = False,
    backend: Annotated[str, typer.Option(help=f"Inference backend: {', '.join(BACKENDS)}.")] = "dense",
    json_out: JsonOut = None,
    log_samples: Annotated[
        bool, typer.Option("--log-samples", help="Also write per-sample records (JSONL) beside --json.")
    ] = False,
    force: Force = False,
    ppl: Annotated[bool, typer.Option("--perplexity", help="Validation perplexity instead of lm-eval tasks.")] = False,
    data: Annotated[
        str | None,
        typer.Option(help="Perplexity data: builtin, c4, owt or a PATH (default: the checkpoint's training data)."),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=1, help="Perplexity: validation tokens (default: the trainer's).")
    ] = None,
) -> None:
    """Zero-shot lm-eval accuracy (GLUE, SuperGLUE, HellaSwag) or validation perplexity of a checkpoint."""
    if list_tasks:
        from evals.harness import GROUPS, TASK_YAMLS

        for name in TASK_YAMLS:
            console.print(name, highlight=False)
        for group, members in GROUPS.items():
            console.print(f"{group}  (group: {', '.join(members)})", highlight=False, soft_wrap=True)
        return
    if ckpt is None:
        raise ChtslError("missing CKPT: the checkpoint or export directory to evaluate (or --list-tasks)")
    if backend not in BACKENDS:
        raise ChtslError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if batch < 1:
        raise ChtslError(f"--batch must be >= 1, got {batch}")
    dtype = parse_dtype(dtype, ("auto", *PACKED_DTYPES))
    if log_samples and (json_out is None or str(json_out) == "-"):
        raise ChtslError("--log-samples needs --json FILE (the samples go beside it)")
    check_output_file(json_out, force, "--json")
    if log_samples and json_out is not None:
        from evals.harness import samples_path

        check_output_file(samples_path(json_out), force, "--json")
    if ppl == (tasks is not None):
        raise ChtslError("pass either --tasks NAMES (lm-eval) or --perplexity (see --list-tasks for names)")
    if ppl:
        if data_dir is not None or limit is not None or log_samples:
            raise ChtslError("--data-dir, --limit and --log-samples are for --tasks; --perplexity uses --data")
        # --perplexity computes as the trainer (fp32); --dtype picks the packed dtype of the weights
        run_perplexity(ckpt, data=data, max_tokens=max_tokens, device=device, backend=backend, output=json_out,
                       force=force, weights=None if dtype == "auto" else dtype, int8_activations=int8_activations)
        return
    if data is not None or max_tokens is not None:
        raise ChtslError("--data and --max-tokens are for --perplexity; lm-eval tasks use --data-dir")
    run_tasks(ckpt, tasks, data_dir=data_dir, batch_size=batch, limit=limit, device=device, dtype=dtype,
              backend=backend, output=json_out, log_samples=log_samples, force=force,
              int8_activations=int8_activations)
