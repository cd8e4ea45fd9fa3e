"""`chtsl generate`: stream a continuation of a prompt from a checkpoint or export, with tokens/s."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated

import typer

from chtsl_infer.console import UserError, console


def generate_command(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint or export directory (with its tokenizer).")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 0.0,
    backend: Annotated[str, typer.Option(help="auto, dense, sparse or onnx.")] = "auto",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
) -> None:
    """Streams generated text (prefill, then one token per step with a KV cache) and prints tokens/s."""
    import torch
    from transformers import TextStreamer

    from chtsl_infer.checkpoint import load_tokenizer
    from chtsl_infer.runtime import BACKENDS, load_runtime

    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature must be >= 0 and finite (0: greedy), got {temperature}")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r}; valid: cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available")
    if not ckpt.is_dir():
        raise UserError(f"checkpoint not found: {ckpt} is not a directory")
    tokenizer = load_tokenizer(ckpt)
    rt = load_runtime(ckpt, backend, device)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise UserError("--prompt encodes to no tokens")
    limit = rt.config.max_position_embeddings
    if ids.shape[1] + max_new_tokens > limit:
        raise UserError(f"prompt ({ids.shape[1]} tokens) + --max-new-tokens {max_new_tokens} exceeds the "
                        f"model's {limit} positions")
    torch.manual_seed(seed)
    streamer = TextStreamer(tokenizer, skip_prompt=False)
    start = time.perf_counter()
    out = rt.generate(ids, max_new_tokens, temperature, streamer=streamer, eos_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    console.print()
    console.print(f"{new} tokens in {seconds:.2f} s: {new / seconds:.1f} tokens/s (backend {rt.backend})",
                      highlight=False)
