"""`chtsl generate`: stream a continuation of a prompt from a checkpoint or export, with tokens/s."""

from __future__ import annotations

import math
import time
from typing import Annotated

import typer

from chtsl_infer.console import check_output_file, console, json_on_stdout, write_json
from chtsl_infer.errors import ChtslError
from chtsl_infer.formats.model_dir import resolve_model_dir
from chtsl_infer.options import Checkpoint, Device, Dtype, Force, Int8Activations, JsonOut, NewTokens
from chtsl_infer.utils import check_seed, check_utf8, inference_dtype, resolve_device, torch_dtype


def generate_command(
    ckpt: Checkpoint,
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    new_tokens: NewTokens = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 0.0,
    backend: Annotated[str, typer.Option(help="auto, dense, sparse or onnx.")] = "auto",
    device: Device = "auto",
    dtype: Dtype = "auto",
    int8_activations: Int8Activations = False,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    json_out: JsonOut = None,
    force: Force = False,
) -> None:
    """Streams generated text (prefill, then one token per step with a KV cache) and prints tokens/s.
    The checkpoint or export must hold its tokenizer; at most --new-tokens are generated (fewer at EOS)."""
    import torch
    from transformers import TextStreamer

    from chtsl_infer.formats.model_dir import load_tokenizer
    from chtsl_infer.runtime.backends import BACKENDS, check_backend_dtype, check_int8_activations, load_runtime

    if backend not in BACKENDS:
        raise ChtslError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if new_tokens <= 0:
        raise ChtslError(f"--new-tokens must be positive, got {new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ChtslError(f"--temperature must be >= 0 and finite (0: greedy), got {temperature}")
    check_seed(seed)
    check_utf8(prompt, "--prompt")
    check_output_file(json_out, force)
    device = resolve_device(device)
    model_dir = resolve_model_dir(ckpt)
    dtype = inference_dtype(dtype, device, model_dir.packed_dtype)
    check_backend_dtype(backend, device, dtype)
    if int8_activations:
        check_int8_activations(backend, device, dtype)
    tokenizer = load_tokenizer(model_dir)
    rt = load_runtime(model_dir, backend, device, torch_dtype(dtype), int8_activations=int8_activations)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ChtslError("--prompt encodes to no tokens")
    limit = rt.config.max_position_embeddings
    if ids.shape[1] + new_tokens > limit:
        raise ChtslError(f"prompt ({ids.shape[1]} tokens) + --new-tokens {new_tokens} exceeds the "
                        f"model's {limit} positions")
    torch.manual_seed(seed)
    with json_on_stdout(json_out):
        streamer = TextStreamer(tokenizer, skip_prompt=False)
        start = time.perf_counter()
        out = rt.generate(ids, new_tokens, temperature, streamer=streamer, eos_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - start
        new = out.shape[1] - ids.shape[1]
        console.print()
        console.print(f"{new} tokens in {seconds:.2f} s: {new / seconds:.1f} tokens/s (backend {rt.backend}, {dtype}"
                      f"{', int8 activations' if int8_activations else ''})",
                      highlight=False)
    write_json({"prompt": prompt, "text": tokenizer.decode(out[0][ids.shape[1]:], skip_special_tokens=True),
                "prompt_tokens": ids.shape[1], "new_tokens": new, "seconds": seconds, "tokens_per_s": new / seconds,
                "backend": rt.backend, "device": device, "dtype": dtype, "int8_activations": int8_activations,
                "temperature": temperature, "seed": seed},
               json_out, force)
