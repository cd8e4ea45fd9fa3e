"""`chtsl train` and `chtsl plot` (Typer commands; heavy imports stay inside the functions)."""

from __future__ import annotations

import typer

from chtsl_infer.console import UserError, check_output_dir, check_output_file, write_json


def train_command(
    preset: str = typer.Option("tiny", help="Recipe preset: tiny, llama60m-c4, llama130m-owt, ..."),
    method: str = typer.Option("chtsl", help="dense|chts|cola|sltrain|naive|act|chtsl."),
    s_total: float = typer.Option(0.9, "--s-total", help="Total sparsity of the linears (0.9, 0.8 or 0.7)."),
    align: str = typer.Option("all", help="Layers in the alignment loss: all|qk|others."),
    align_lambda: float | None = typer.Option(None, "--align-lambda", help="λ of the alignment loss."),
    steps: int | None = typer.Option(None, help="Training iterations (preset's if omitted)."),
    warmup: int | None = typer.Option(None, help="LR warm-up iterations."),
    lr: float | None = typer.Option(None, help="Peak learning rate."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size in sequences."),
    micro_batch_size: int | None = typer.Option(None, "--micro-batch-size", help="Sequences per forward per rank."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Tokens per sequence."),
    update_interval: int | None = typer.Option(None, "--update-interval", help="ΔT between topology updates."),
    restart_warmup: int | None = typer.Option(None, "--restart-warmup", help="LR warm-up after each update."),
    eval_every: int | None = typer.Option(None, "--eval-every", help="Validation perplexity every N steps."),
    save_every: int | None = typer.Option(None, "--save-every", help="Checkpoint every N steps."),
    ocr_every: int | None = typer.Option(None, "--ocr-every", help="Log per-layer OCR/cosine every N steps."),
    eval_tokens: int | None = typer.Option(None, "--eval-tokens", help="Validation tokens per evaluation."),
    data: str | None = typer.Option(None, help="builtin | c4 | owt | PATH (file, dir or glob of txt/jsonl/parquet)."),
    tokenizer: str | None = typer.Option(None, help="bpe (trained on the corpus, cached) or a HF name/path."),
    vocab_size: int | None = typer.Option(None, "--vocab-size", help="Vocabulary of a trained BPE."),
    packing: bool = typer.Option(False, "--packing", help="Concatenate documents instead of truncate/pad."),
    grad_clip: float | None = typer.Option(None, "--grad-clip", help="Max grad norm (0: off; cola: 0.5)."),
    num_layers: int | None = typer.Option(None, "--num-layers", help="Override the preset's number of blocks."),
    dtype: str = typer.Option("auto", help="auto (CUDA: bf16 autocast, CPU: fp32) | fp32 | bf16 (autocast; CPU too)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    seed: int = typer.Option(0, help="Seed of init, data order and topology."),
    sparse_storage: str = typer.Option(
        "auto", "--sparse-storage",
        help="How S is held in training: csr (values + CSR indices, state ∝ nnz) | masked (dense weight × mask) "
             "| auto (csr on CPU with the compiled kernels at low density, else masked)."),
    out: str = typer.Option("ckpt", help="Checkpoint directory (latest complete checkpoint)."),
    resume: str | None = typer.Option(None, help="Continue exactly from this checkpoint directory."),
    stop_at: int | None = typer.Option(None, "--stop-at", help="Save and stop after this step (resume later)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the Rich progress bar."),
    json_out: str | None = typer.Option(None, "--json", help="Write the final summary as JSON here ('-': stdout)."),
    force: bool = typer.Option(False, "--force", help="Let --json replace an existing file."),
) -> None:
    """Train a CHTsL (or baseline) LLaMA from scratch; `torchrun` runs it with DDP."""
    from dataclasses import asdict

    from train.trainer import TrainArgs, print_result, train

    check_output_file(json_out, force)  # before the run, not after it
    args = TrainArgs(
        preset=preset, method=method, s_total=s_total, align=align, align_lambda=align_lambda, steps=steps,
        warmup=warmup, lr=lr, batch_size=batch_size, micro_batch_size=micro_batch_size, seq_len=seq_len,
        update_interval=update_interval, restart_warmup=restart_warmup, eval_every=eval_every,
        save_every=save_every, ocr_every=ocr_every,
        eval_tokens=eval_tokens, data=data, tokenizer=tokenizer, vocab_size=vocab_size, packing=packing,
        grad_clip=grad_clip, num_layers=num_layers, dtype=dtype, device=device, seed=seed, out=out,
        sparse_storage=sparse_storage,
        resume=resume, stop_at=stop_at, progress=progress,
    )
    result = train(args)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print_result(result)
        summary = {k: v for k, v in asdict(result).items() if k != "history"}
        write_json(summary, json_out, force)
    if result.stopped == "nan":
        raise typer.Exit(1)


def plot_command(
    checkpoint: str = typer.Argument(..., help="Checkpoint directory with metrics.jsonl."),
    out: str | None = typer.Option(None, help="Output directory for the PNGs (default: CHECKPOINT/plots)."),
) -> None:
    """Loss / validation-perplexity curves and the OCR-over-steps grid (paper Figure 2) as PNGs."""
    from pathlib import Path

    from chtsl_infer.console import console
    from train.plot import plot_run

    path = Path(checkpoint)
    if not (path / "metrics.jsonl").is_file():
        raise UserError(f"{path} has no metrics.jsonl")
    target = check_output_dir(Path(out) if out else path / "plots", "--out")
    written = plot_run(path / "metrics.jsonl", target)
    for p in written:
        console.print(f"wrote {p}")
