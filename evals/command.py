"""`chtsl eval`: zero-shot GLUE/SuperGLUE through lm-eval, or the trainer's validation perplexity.

    chtsl eval ckpt/ --tasks rte,copa [--data-dir DIR] [--output res.json --log-samples]
    chtsl eval ckpt/ --perplexity [--data builtin|c4|owt|PATH] [--max-tokens N]
    chtsl eval --list-tasks

Heavy imports (torch, transformers, datasets, lm_eval) stay inside the functions: `chtsl --help`
stays fast, and with `--data-dir` the offline switches are set before `datasets`/`lm_eval` load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from chtsl_infer.console import UserError, check_output_file, console, err_console, write_json

BACKENDS = ("dense", "sparse", "onnx", "auto")  # dense: the checkpoint's model; others: chtsl_infer.runtime
DTYPES = ("float32", "bfloat16", "float16")


def _device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise UserError(f"unknown --device {device!r}; valid: cpu, cuda, cuda:N, auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    return device


def _progress():  # -> rich.progress.Progress
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,  # a failure leaves one error line
    )


def check_model_dir(ckpt: Path) -> None:
    """UserError unless `ckpt` is a training checkpoint or a packed export directory."""
    from chtsl_infer.checkpoint import check_checkpoint_dir
    from chtsl_infer.packed import is_packed_dir

    if not is_packed_dir(ckpt):
        check_checkpoint_dir(ckpt)


def _load(ckpt: Path, backend: str, device: str, dtype: str):
    """(causal LM module on `device`, eval mode; tokenizer) of a checkpoint or packed export.

    `dense` is the checkpoint's own model (`load_model`: the trainer's computation, the reference);
    the other backends come from `chtsl_infer.runtime.load_runtime` and score through
    `Runtime.logits` — the same forward as `chtsl bench` (feature-major for the torch backends,
    no transposes around the sparse kernel; matches transformers' forward within 1e-4).
    """
    import torch

    from chtsl_infer.checkpoint import load_model, load_tokenizer

    tokenizer = load_tokenizer(ckpt)
    if backend == "dense":
        return load_model(ckpt, device=device).to(getattr(torch, dtype)), tokenizer
    from chtsl_infer.runtime import load_runtime
    from evals.harness import RuntimeModule

    runtime = load_runtime(ckpt, backend=backend, device=device, dtype=getattr(torch, dtype))
    return RuntimeModule(runtime), tokenizer


def run_tasks(ckpt: Path, tasks: str, *, data_dir: Path | None, batch_size: int, limit: int | None, device: str,
              dtype: str, backend: str, output: Path | None, log_samples: bool, force: bool = False
              ) -> dict[str, Any]:
    """Runs lm-eval on `tasks` and prints the results table; returns lm-eval's results dict."""
    if data_dir is not None:
        if not data_dir.is_dir():
            raise UserError(f"--data-dir {data_dir} is not a directory")
        from evals.harness import enable_offline

        enable_offline()  # before datasets / lm_eval are imported: they read it at import
    from evals import harness

    names, notes = harness.resolve_tasks(tasks)
    check_model_dir(ckpt)
    if data_dir is not None:  # find and check every file before the (slow) model load and lm-eval run
        harness.task_configs(names, data_dir)
    model, tokenizer = _load(ckpt, backend, _device(device), dtype)
    for note in notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    with harness.quiet_lm_eval(), _progress() as progress:
        results = harness.evaluate(model, tokenizer, names, data_dir=data_dir, batch_size=batch_size, limit=limit,
                                   log_samples=log_samples, progress=progress)
    rows = harness.metric_rows(results)
    table = harness.results_table(rows, f"{ckpt} · zero-shot · lm-eval {results.get('lm_eval_version', '')}")
    (err_console if str(output) == "-" else console).print(table)  # stdout is the JSON's with --output -
    if output is not None:
        for path in harness.write_results(results, output, log_samples, force):
            err_console.print(f"wrote {path}", highlight=False)
    return results


def validation_spec(ckpt: Path, config, *, data: str | None, max_tokens: int | None):
    """(DataSpec, eval batch size, trainer's last validation record or None) for `ckpt`.

    A training checkpoint's `trainer_state/args.json` gives the trainer's data, sequence length,
    packing, eval tokens and micro-batch, so the default reproduces its validation perplexity;
    `data` / `max_tokens` override. Other checkpoints use `DataSpec`'s defaults (builtin corpus),
    the sequence length capped at the model's positions.
    """
    from train.checkpoint import is_training_checkpoint, load_state
    from train.data import DataSpec

    spec = DataSpec()
    eval_batch, last_val = 16, None
    if is_training_checkpoint(ckpt):
        state, args = load_state(ckpt)
        fields = {k: args[k] for k in ("data", "tokenizer", "vocab_size", "seq_len", "packing", "eval_tokens", "seed")
                  if args.get(k) is not None}
        spec = DataSpec(**fields)
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
                   output: Path | None, force: bool = False) -> dict[str, Any]:
    """Validation perplexity as the trainer computes it (same data, tokenization, batches, function)."""
    from evals.perplexity import perplexity
    from train.data import validation_batches

    device = _device(device)
    check_model_dir(ckpt)
    model, tokenizer = _load(ckpt, backend, device, "float32")
    spec, eval_batch, last_val = validation_spec(ckpt, model.config, data=data, max_tokens=max_tokens)
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
        "checkpoint": str(ckpt), "data": spec.data, "seq_len": spec.seq_len, "packing": spec.packing,
        "max_tokens": spec.eval_tokens, "tokens": result.tokens, "nll": result.nll, "ppl": result.ppl,
        "trainer_val_ppl": (last_val or {}).get("val_ppl"),
    }
    from rich.table import Table

    table = Table(title=f"{ckpt} · validation perplexity")
    for col in ("data", "seq len", "tokens", "nll (nats/token)", "ppl", "trainer's last val ppl"):
        table.add_column(col, justify="left" if col == "data" else "right")
    trainer_ppl = report["trainer_val_ppl"]
    table.add_row(spec.data, str(spec.seq_len), f"{result.tokens:,}", f"{result.nll:.4f}", f"{result.ppl:.4f}",
                  "—" if trainer_ppl is None else f"{trainer_ppl:.4f}")
    (err_console if str(output) == "-" else console).print(table)  # stdout is the JSON's with --output -
    write_json(report, output, force, "--output")
    return report


def eval_command(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint directory (training checkpoint or packed export).")] = Path(
        "ckpt"
    ),
    tasks: Annotated[str | None, typer.Option("--tasks", help="Comma-separated lm-eval task or group names.")] = None,
    list_tasks: Annotated[bool, typer.Option("--list-tasks", help="Print the supported task and group names.")] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Offline data: DIR/<dataset>/<config>/<split>.jsonl (or .parquet)."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per lm-eval forward pass.")] = 8,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N examples per task.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda when available).")] = None,
    dtype: Annotated[str, typer.Option(help=f"Model dtype for lm-eval: {', '.join(DTYPES)}.")] = "float32",
    backend: Annotated[str, typer.Option(help=f"Inference backend: {', '.join(BACKENDS)}.")] = "dense",
    output: Annotated[Path | None, typer.Option("--output", help="Write the results JSON here.")] = None,
    log_samples: Annotated[
        bool, typer.Option("--log-samples", help="Also write per-sample records (JSONL) beside --output.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Let --output replace an existing file.")] = False,
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
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if log_samples and (output is None or str(output) == "-"):
        raise UserError("--log-samples needs --output FILE (the samples go beside it)")
    check_output_file(output, force, "--output")
    if log_samples and output is not None:
        from evals.harness import samples_path

        check_output_file(samples_path(output), force, "--output")
    if ppl == (tasks is not None):
        raise UserError("pass either --tasks NAMES (lm-eval) or --perplexity (see --list-tasks for names)")
    if ppl:
        if data_dir is not None or limit is not None or log_samples:
            raise UserError("--data-dir, --limit and --log-samples are for --tasks; --perplexity uses --data")
        if dtype != "float32":
            raise UserError("--dtype is for --tasks; --perplexity computes as the trainer (fp32, CUDA: bf16 autocast)")
        run_perplexity(ckpt, data=data, max_tokens=max_tokens, device=device, backend=backend, output=output,
                       force=force)
        return
    if data is not None or max_tokens is not None:
        raise UserError("--data and --max-tokens are for --perplexity; lm-eval tasks use --data-dir")
    run_tasks(ckpt, tasks, data_dir=data_dir, batch_size=batch_size, limit=limit, device=device, dtype=dtype,
              backend=backend, output=output, log_samples=log_samples, force=force)
