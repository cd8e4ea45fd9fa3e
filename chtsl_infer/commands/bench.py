"""`chtsl bench`: tokens/s and peak memory of a model per backend, next to the dense model of its shape.

Each configuration (model × backend) runs in a fresh worker process (`python -m chtsl_infer.commands.bench
WORKER_SPEC_JSON`), so its peak memory is its own, measured over the forwards (warm-up and timed)
once the model is built: CPU — peak RSS (VmHWM) of the worker, reset after the build through
/proc/self/clear_refs, so it covers Python, torch, the compiled kernel (loaded in every CPU worker
alike), the resident model and the forward's activations and logits; the build's own peak is
reported as `build_peak_bytes` (where the reset is unsupported, `peak_scope` says "process" and
the peak includes the build), plus `peak_tensor_bytes`, the peak of live torch tensors over one
forward (deterministic, while RSS moves by tens of MiB between runs of the same configuration
on a shared VM); CUDA — `torch.cuda.max_memory_allocated` after a reset at the same point.
Timings are the median over `--steps` timed full forwards (logits over every position, no KV
cache, as the paper's Table 12) after `--warmup` untimed ones.

`--mode decode` measures generation as users run it: per repetition, a prefill of `--batch`
prompts of `--prompt-len` random tokens into a preallocated KV cache, then `--new-tokens` greedy
decoding steps of one token per sequence (no early stop). Reported: prefill tokens/s (median over
repetitions), decode tokens/s (batch × new tokens over the decode steps' total time, median over
repetitions), per-token latency p50/p90 over every timed decode step, and peak memory as above
(`peak_tensor_bytes` over a prefill and two decode steps). `--steps` counts repetitions (CPU 1,
CUDA 3); the warm-up is a prefill and up to 4 decode steps.

Every number is also held against what the machine can do, measured in the same run by a first worker
(`machine_report`, `runtime.machine`): CPU name, flags, threads and last-level cache, and in decode
mode the streaming read bandwidth (all threads reading a buffer of 4 × the last-level cache, at least
256 MiB), in forward mode a dense GEMM's GFLOP/s. Decode reports per backend the bytes read per
decoded token, counted from the model's tensors (`runtime.cost.decode_bytes`: sparse values, column
indices, row pointers, low-rank factors, norms, lm_head, embedding rows, the KV cache at the measured
positions), and the bandwidth that achieved; forward the FLOPs per token and GFLOP/s. Each row's
bound is the dense baseline's bytes (FLOPs) per token ÷ its own; a speedup above it is flagged
(`add_limits`). The dense baseline is the fastest dense path: its linears multiply a few decoding
tokens through torch or the project's GEMV (`backends.dense_fm`), whichever the first worker timed
faster over one block's dense shapes (`--dense-path` forces one); the JSON and the second table say
which.

Defaults keep `chtsl bench --batch 128` within 3 minutes on 2 CPU cores: on CPU seq 32, 3 timed
steps after 1 warm-up (on CUDA seq 256, 20 after 5). The paper's protocol is `--seq 256
--steps 5000` and only runs when asked.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from chtsl_infer.console import check_output_file, console, json_on_stdout, write_json
from chtsl_infer.errors import ChtslError
from chtsl_infer.formats.model_dir import resolve_model_dir
from chtsl_infer.model.methods import DEFAULT_METHOD, DENSE, METHOD_CHOICES, METHODS
from chtsl_infer.options import Batch, Device, Dtype, Force, Int8Activations, JsonOut, NewTokens, OptionalCheckpoint
from chtsl_infer.utils import inference_dtype, resolve_device, torch_dtype

MODES = ("forward", "decode")
BOUND_SLACK = 1.05  # a speedup this far above its byte or FLOP bound is flagged (not timing noise)
GEMM_MAX_TOKENS = 4096  # the machine's GEMM rate is measured at the run's tokens, at most this many


def _config_for(spec: dict[str, Any]):  # -> ChtslConfig
    """The config a worker benchmarks: the preset's at s_total/method, or a checkpoint's (any method)."""
    from chtsl_infer.model.configuration import ChtslConfig
    from chtsl_infer.model.presets import build_config

    if spec.get("ckpt"):
        config = resolve_model_dir(spec["ckpt"]).config()
        if spec["method"] == DENSE:  # the dense model of the checkpoint's shape
            fields = config.to_dict()
            fields["chtsl"] = {**config.chtsl, "method": DENSE, "storage": "masked"}
            return ChtslConfig(**{k: v for k, v in fields.items() if k not in ("model_type", "transformers_version")})
        return config
    return build_config(spec["preset"], method=spec["method"], s_total=spec["s_total"])


def peak_tensor_bytes(forward: Callable[[], object], kept_bytes: int) -> int:
    """Peak bytes of live torch tensors during one `forward()` on CPU: the CPU analogue of
    `torch.cuda.max_memory_allocated`, free of the allocator and OS effects in peak RSS.

    `kept_bytes`: the tensors alive across forwards (model, logits buffer, workspace, inputs); the
    forward's own allocations and frees come from torch.profiler's memory events, summed in time
    order. Memory outside torch tensors (the C kernel's tile buffers, MKL scratch) is not counted.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward()
    deltas = sorted(
        [(e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.name == "[memory]"]
        + [(e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
           if e.name != "[memory]" and e.self_cpu_memory_usage > 0])
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return kept_bytes + peak


def reset_peak_rss() -> bool:
    """Resets this process's VmHWM to its current RSS (Linux ≥ 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory of this process: VmHWM of /proc/self/status on Linux.

    Not `ru_maxrss`: Linux carries it over fork + exec, so a worker spawned by a big parent would
    report the parent's peak; VmHWM belongs to the address space, which exec replaces.
    """
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Builds one configuration, times it and reports (in this process) — the worker's body."""
    import torch

    from chtsl_infer import kernels
    from chtsl_infer.runtime.backends import from_packed, load_packed_any, load_runtime, random_packed, set_dense_path

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    dtype = torch_dtype(spec["dtype"])
    if device.type == "cpu":  # every CPU worker loads the compiled kernel, whatever its backend: same base
        kernels.cpu_kernel_status()
    if spec.get("machine"):
        return machine_report(spec)
    base_rss = peak_rss_bytes()
    t0 = time.perf_counter()
    if spec["backend"] == "onnx":
        rt = load_runtime(spec["ckpt"], "onnx", device, dtype)
    else:
        if spec.get("ckpt") and spec["method"] != DENSE:
            packed = load_packed_any(spec["ckpt"])
        else:
            packed = random_packed(_config_for(spec), seed=0)
        rt = from_packed(packed, spec["backend"], device, dtype, consume=True,
                         int8_activations=spec.get("int8_activations", False))
        del packed
        set_dense_path(rt.model, spec.get("dense_path", "torch"))
    build_s = time.perf_counter() - t0
    if spec.get("mode", "forward") == "decode":
        report = _decode_report(rt, spec, device)
    else:
        report = _forward_report(rt, spec, device)
    return {**report, "backend": rt.backend, "int8_activations": rt.int8_activations,
            "model_bytes": rt.model_bytes, "build_s": build_s,
            "dense_path": _dense_path_used(rt),
            "base_rss_bytes": int(base_rss) if device.type == "cpu" else 0}  # after imports + kernel load


def _backend_cell(row: dict[str, Any]) -> str:
    """A result row's backend as the tables show it: "a8" added where its sparse products ran with int8
    activations (`--int8-activations`)."""
    return row["backend"] + (" a8" if row.get("int8_activations") else "")


def _dense_path_used(rt) -> str | None:  # rt: Runtime
    """How the runtime's dense linears multiply a few decoding tokens (`backends.dense_fm`); None where
    it has none (the sparse backend: its dense reads, the lm_head's, are the project's GEMV anyway)."""
    from chtsl_infer.runtime.backends import FusedLinears

    if rt.model is None:
        return None
    paths = {m.dense_path for m in rt.model.modules() if isinstance(m, FusedLinears) and m.weight is not None}
    return paths.pop() if paths else None


def machine_report(spec: dict[str, Any]) -> dict[str, Any]:
    """The machine's limits for a run (`runtime.machine`), measured in a worker of their own before the
    configurations: CPU name, flags, threads and last-level cache; in decode mode the streaming read
    bandwidth, in forward mode a dense GEMM's GFLOP/s at the dense model's largest group and the
    run's tokens; and, where `spec["dense_path"]` is "auto", the time of each dense path of
    `machine.dense_paths` over a block's dense linears (streamed from memory: `machine.stream_blocks`
    copies in turn) and the faster one (`dense_path`)."""
    import torch

    from chtsl_infer.runtime import machine

    # the dense baseline's dtype: an int8 run's baseline is the dense fp32 model (timed as int8, the GEMV
    # path did not apply, and the baseline fell back to torch's: 2.4× slower at llama60m-c4)
    dtype = torch_dtype("fp32" if spec["dtype"] == "int8" else spec["dtype"])
    decode = spec["mode"] == "decode"
    report: dict[str, Any] = {"cpu_model": machine.cpu_model(), "cpu_flags": machine.cpu_flags(),
                              "threads": torch.get_num_threads(), "llc_bytes": machine.llc_bytes()}
    if spec["device"] != "cpu":
        return {**report, "dense_path": "torch", "dense_path_s": {}}
    config = _config_for({**spec, "method": DENSE})
    shapes = machine.dense_group_shapes(config)
    n_tok = spec["batch"] if decode else spec["batch"] * spec["seq"]
    if decode:
        size = machine.stream_bytes(report["llc_bytes"])
        readers = machine.stream_read(size)
        report.update(stream_buffer_bytes=size, stream_read_by_reader_gbps=readers,
                      stream_read_gbps=max(readers.values()))
    else:
        n_out, n_in = max(shapes, key=lambda s: s[0] * s[1])
        report.update(gemm_shape=[n_out, n_in, min(n_tok, GEMM_MAX_TOKENS)],
                      gemm_gflops=machine.gemm_gflops(n_out, n_in, min(n_tok, GEMM_MAX_TOKENS), dtype))
    paths = machine.dense_paths(n_tok, dtype)
    times = {}
    if spec["dense_path"] == "auto" and len(paths) > 1:
        blocks = machine.stream_blocks(shapes, dtype.itemsize, config.num_hidden_layers, report["llc_bytes"])
        times = machine.time_dense_paths(shapes, n_tok, dtype, blocks)
        report["dense_path_blocks"] = blocks
    report["dense_path_s"] = times  # per path: seconds for one block's dense linears
    chosen = min(times, key=times.__getitem__) if times else spec["dense_path"]
    report["dense_path"] = chosen if chosen in paths else "torch"  # auto, or gemv without the kernels: torch
    return report


def _reset_peak(device) -> tuple[int, str]:  # device: torch.device
    """(peak so far: the build's, what the next peak covers) and resets the peak counter."""
    import torch

    build_peak = peak_rss_bytes() if device.type == "cpu" else torch.cuda.max_memory_allocated()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return build_peak, "forwards"
    return build_peak, "forwards" if reset_peak_rss() else "process"


def _peak(device) -> int:  # device: torch.device
    import torch

    return int(torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes())


def _forward_report(rt, spec: dict[str, Any], device) -> dict[str, Any]:  # rt: Runtime
    """Full forwards (logits over every position, no cache): the paper's Table 12 protocol."""
    import torch

    ids = torch.randint(0, rt.config.vocab_size, (spec["batch"], spec["seq"]), device=device)
    # One logits buffer for every step, as a serving loop would keep (the (batch, seq, vocab)
    # logits are the largest activation; allocating them afresh re-faults their pages each step).
    logits = torch.empty(spec["batch"], spec["seq"], rt.config.vocab_size, device=device, dtype=rt.dtype)

    def step() -> float:
        _sync(device)
        start = time.perf_counter()
        rt.logits(ids, out=logits)
        _sync(device)
        return time.perf_counter() - start

    build_peak, scope = _reset_peak(device)
    for _ in range(spec["warmup"]):
        step()
    times = [step() for _ in range(spec["steps"])]
    tokens = spec["batch"] * spec["seq"]
    peak = _peak(device)
    if device.type == "cpu" and rt.model is not None:  # after the timed steps: the profiler costs time
        tensors = peak_tensor_bytes(lambda: rt.logits(ids, out=logits),
                                    rt.model_bytes + sum(t.nbytes for t in (ids, logits, *rt.workspace.values())))
    else:
        tensors = peak if device.type == "cuda" else 0
    tokens_per_s = tokens / statistics.median(times)
    flops = None
    if rt.model is not None:
        from chtsl_infer.runtime.cost import forward_flops

        flops = forward_flops(rt.model)
    return {
        "tokens_per_s": tokens_per_s,
        "step_s": times,
        "flops_per_token": flops,  # the linears' and lm_head's (runtime.cost.forward_flops)
        "gflops": None if flops is None else flops * tokens_per_s / 1e9,
        "peak_memory_bytes": peak,
        "peak_tensor_bytes": int(tensors),  # CPU: see peak_tensor_bytes(); CUDA: = peak_memory_bytes
        "peak_scope": scope,
        "build_peak_bytes": int(build_peak),
    }


def _sync(device) -> None:  # device: torch.device
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def decode_run(rt, ids, new_tokens: int, device) -> tuple[float, list[float], Any]:  # rt: Runtime, ids: Tensor
    """One generation: prefill `ids` (batch, prompt) into a fresh cache, then `new_tokens` greedy decode steps.

    Each step feeds the token chosen from the previous logits (the prefill's for the first) and
    yields the next logits, so the cache ends at prompt + new_tokens positions. Returns (prefill
    seconds, seconds of each decode step, the fed tokens (batch, new_tokens)). No early stop.
    """
    import torch

    batch, prompt = ids.shape
    cache = rt.new_cache(batch, prompt + new_tokens)
    last = torch.empty(batch, rt.config.vocab_size, device=rt.device, dtype=rt.dtype)
    tokens = torch.empty(batch, new_tokens, dtype=torch.long, device=rt.device)
    _sync(device)
    start = time.perf_counter()
    last = rt.decode_step(ids, cache, out=last)
    _sync(device)
    prefill = time.perf_counter() - start
    steps = []
    for i in range(new_tokens):
        start = time.perf_counter()
        nxt = last.argmax(-1, keepdim=True)
        tokens[:, i:i + 1] = nxt
        # a cache-less ONNX graph (an old export) gets the whole text each step
        feed = nxt if cache is not None else torch.cat([ids, tokens[:, :i + 1]], dim=1)
        last = rt.decode_step(feed, cache, out=last)
        _sync(device)
        steps.append(time.perf_counter() - start)
    return prefill, steps, tokens


def _decode_report(rt, spec: dict[str, Any], device) -> dict[str, Any]:  # rt: Runtime
    """Generation: prefill then greedy decoding with the KV cache (module docstring)."""
    import torch

    batch, prompt, new = spec["batch"], spec["prompt_len"], spec["new_tokens"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, rt.config.vocab_size, (batch, prompt), generator=gen).to(device)
    build_peak, scope = _reset_peak(device)
    for _ in range(spec["warmup"]):
        decode_run(rt, ids, min(new, 5), device)
    prefills, totals, latencies = [], [], []
    for _ in range(spec["steps"]):
        prefill, steps, _ = decode_run(rt, ids, new, device)
        prefills.append(prefill)
        totals.append(sum(steps))
        latencies += steps
    peak = _peak(device)
    if device.type == "cpu" and rt.model is not None:
        cache_bytes = rt.new_cache(batch, prompt + new).nbytes()  # allocated inside the profiled run
        tensors = peak_tensor_bytes(lambda: decode_run(rt, ids, 3, device),
                                    rt.model_bytes + ids.nbytes + sum(t.nbytes for t in rt.workspace.values()))
        tensors = max(tensors, rt.model_bytes + cache_bytes)
    else:
        tensors = peak if device.type == "cuda" else 0
    lat = sorted(latencies)
    tokens_per_s = batch * new / statistics.median(totals)
    return {
        "tokens_per_s": tokens_per_s,  # decode tokens/s
        **_decode_traffic(rt, batch, prompt, new, tokens_per_s),
        "prefill_tokens_per_s": batch * prompt / statistics.median(prefills),
        "prefill_s": prefills,
        "decode_s": totals,
        "latency_p50_s": _quantile(lat, 0.5),
        "latency_p90_s": _quantile(lat, 0.9),
        "peak_memory_bytes": peak,
        "peak_tensor_bytes": int(tensors),
        "peak_scope": scope,
        "build_peak_bytes": int(build_peak),
    }


def _decode_traffic(rt, batch: int, prompt: int, new: int, tokens_per_s: float) -> dict[str, Any]:  # rt: Runtime
    """Bytes read per decoded token (`runtime.cost.decode_bytes`: a step's bytes ÷ batch, the KV cache at
    the measured positions), by part per step, and the bandwidth that achieved (GB/s = 10⁹ bytes/s).
    None for an ONNX session (its tensors are not ours to count)."""
    if rt.model is None:
        return {"bytes_per_token": None, "bytes_parts": None, "effective_gbps": None}
    from chtsl_infer.runtime.cost import decode_bytes, mean_positions

    kv_per_position = rt.new_cache(batch, 1).nbytes()  # every block's keys and values at one position
    parts = decode_bytes(rt.model, batch, kv_per_position, mean_positions(prompt, new))
    per_token = sum(parts.values()) / batch
    return {"bytes_per_token": per_token, "bytes_parts": parts, "effective_gbps": per_token * tokens_per_s / 1e9}


def _quantile(sorted_values: list[float], q: float) -> float:
    """The q-quantile of sorted values, linearly interpolated (numpy's default); 0 when empty."""
    if not sorted_values:
        return 0.0
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _spawn(spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Runs one configuration in a fresh interpreter; its JSON report (last stdout line)."""
    cmd = [sys.executable, "-m", "chtsl_infer.commands.bench", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ChtslError(f"benchmark worker for {spec['label']} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        raise ChtslError(f"benchmark worker for {spec['label']} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def bench_command(
    ckpt: OptionalCheckpoint = None,
    mode: Annotated[str, typer.Option(help="forward (full-sequence logits) or decode (prefill + KV-cache "
                                           "generation).")] = "forward",
    preset: Annotated[str, typer.Option(help="Preset when no CKPT is given (random weights).")] = "llama60m-c4",
    s_total: Annotated[float, typer.Option("--s-total", help="Total sparsity of the preset's linears.")] = 0.9,
    method: Annotated[str, typer.Option(help=f"Preset model method: {METHOD_CHOICES}.")] = DEFAULT_METHOD,
    batch: Batch = 128,
    seq: Annotated[int | None, typer.Option(help="Tokens per sequence (CPU 32, CUDA 256); forward mode.")] = None,
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="Prompt tokens per sequence; decode mode.")] = 128,
    new_tokens: NewTokens = 64,
    steps: Annotated[int | None, typer.Option(help="Timed steps (CPU 3, CUDA 20; paper 5000); decode: "
                                                   "repetitions (CPU 1, CUDA 3).")] = None,
    warmup: Annotated[int | None, typer.Option(help="Warm-up steps (CPU 1, CUDA 5).")] = None,
    backend: Annotated[str, typer.Option(help="Backend(s), comma-separated: auto, dense, sparse, onnx.")] = "auto",
    compare: Annotated[str, typer.Option(help="Other methods of the shape, e.g. cola,sltrain.")] = "",
    device: Device = "auto",
    dtype: Dtype = "auto",
    int8_activations: Int8Activations = False,
    json_out: JsonOut = None,
    timeout: Annotated[float, typer.Option(help="Seconds allowed per configuration.")] = 1800.0,
    dense_path: Annotated[str, typer.Option(
        "--dense-path", help="How dense linears multiply ≤ 4 tokens per step (decoding): auto (the faster of "
                             "torch and gemv, measured at the start), torch or gemv (the project's GEMV).")] = "auto",
    force: Force = False,
) -> None:
    """Tokens/s and peak memory per backend, as ratios to the dense model of the same shape (of CKPT, or
    without it of a random-weight --preset model)."""
    from chtsl_infer.runtime.backends import BACKENDS, DENSE_PATHS, check_backend_dtype, check_int8_activations

    if mode not in MODES:
        raise ChtslError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if dense_path not in ("auto", *DENSE_PATHS):
        raise ChtslError(f"unknown --dense-path {dense_path!r}; valid: auto, {', '.join(DENSE_PATHS)}")
    if batch <= 0:
        raise ChtslError(f"--batch must be positive, got {batch}")
    for name, value in (("--seq", seq), ("--steps", steps), ("--prompt-len", prompt_len),
                        ("--new-tokens", new_tokens)):
        if value is not None and value <= 0:
            raise ChtslError(f"{name} must be positive, got {value}")
    if warmup is not None and warmup < 0:
        raise ChtslError(f"--warmup must be >= 0, got {warmup}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ChtslError(f"--timeout must be a positive number of seconds, got {timeout}")
    check_output_file(json_out, force)
    device = resolve_device(device)
    # `auto` keeps an int8 export's int8 weights (an explicit --dtype is checked before the checkpoint is read)
    stored = resolve_model_dir(ckpt).packed_dtype if ckpt is not None and dtype == "auto" else None
    dtype = inference_dtype(dtype, device, stored)
    backends = _split(backend) or ["auto"]
    for b in backends:
        if b not in BACKENDS:
            raise ChtslError(f"unknown backend {b!r}; valid: {', '.join(BACKENDS)}")
        if b == "onnx" and ckpt is None:
            raise ChtslError("backend 'onnx' needs an export directory with model.onnx as CKPT")
        check_backend_dtype(b, device, dtype)
    if int8_activations:  # applies to the sparse/auto entries; the dense ones run without
        check_int8_activations(next((b for b in backends if b in ("sparse", "auto")), backends[0]), device, dtype)
    for m in _split(compare):
        if m not in METHODS:
            raise ChtslError(f"unknown method {m!r} in --compare; valid: {', '.join(METHODS)}")
        if ckpt is not None and m != DENSE:
            raise ChtslError("--compare builds preset models; use it without CKPT (the dense baseline is always shown)")
    if ckpt is not None:
        model_dir = resolve_model_dir(ckpt)
        if "onnx" in backends:
            model_dir.require_onnx()
        if any(b != "onnx" for b in backends):
            model_dir.require_weights()
    if ckpt is None:
        config = _config_for({"preset": preset, "method": method, "s_total": s_total})  # ChtslError on a bad name
    else:
        config = model_dir.config()
    positions = config.max_position_embeddings
    if mode == "decode" and prompt_len + new_tokens > positions:
        raise ChtslError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceeds the model's {positions} "
                         "positions")
    cpu = device == "cpu"
    n_seq = seq or (32 if cpu else 256)
    if n_seq > config.max_position_embeddings:
        raise ChtslError(f"--seq {n_seq} exceeds the model's {config.max_position_embeddings} positions")
    from chtsl_infer.kernels import GEMV_MAX_TOKENS

    step_tokens = batch if mode == "decode" else batch * n_seq
    if dense_path == "gemv" and (not cpu or step_tokens > GEMV_MAX_TOKENS):
        raise ChtslError(f"--dense-path gemv multiplies 1-{GEMV_MAX_TOKENS} tokens per step on CPU; this run has "
                         f"{step_tokens} on {device} (decode with --batch ≤ {GEMV_MAX_TOKENS}, or --dense-path auto)")
    kernel_report = None  # which CPU kernels every number used (ISA, flags, settings): into the JSON
    if cpu:  # build the sparse kernel once here (first use only), not in each worker
        from chtsl_infer import kernels

        kernel_report = kernels.kernel_info().as_json()
    decode = mode == "decode"
    common = {
        "mode": mode, "batch": batch, "seq": n_seq, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "steps": steps or ((1 if cpu else 3) if decode else (3 if cpu else 20)),
        "warmup": (1 if cpu else 5) if warmup is None else warmup, "device": device, "dtype": dtype,
        "preset": preset, "s_total": s_total, "ckpt": str(ckpt) if ckpt else None, "dense_path": dense_path,
    }
    main_name = ckpt.name if ckpt else method
    baseline = {"label": "dense (baseline)", "model": "dense (baseline)", "method": DENSE, "backend": "dense"}
    if dtype == "int8":  # int8 weights are the sparse model's; the baseline stays the dense fp32 model
        baseline["dtype"] = "fp32"
    specs = [{**common, **baseline}]
    for b in backends:
        a8 = int8_activations and b in ("sparse", "auto")
        specs.append({**common, "label": f"{main_name} [{b}{' a8' if a8 else ''}]", "model": main_name,
                      "method": method, "backend": b, "int8_activations": a8})
    for m in _split(compare):
        if m != DENSE:
            specs.append({**common, "label": f"{m} [auto]", "model": m, "method": m, "backend": "auto"})
    if ckpt is not None:  # the checkpoint's own method (the worker loads its weights)
        for s in specs[1:1 + len(backends)]:
            s["method"] = "checkpoint"

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("measuring the machine", total=len(specs) + 1)
        # First the machine's limits and the dense path the torch backends' dense linears then take.
        machine = _spawn({**common, "label": "machine", "machine": True}, timeout)
        progress.advance(task)
        for spec in specs:
            spec["dense_path"] = machine["dense_path"]
            progress.update(task, description=f"benchmarking {spec['label']}")
            results.append({**spec, **_spawn(spec, timeout)})
            progress.advance(task)
    base = results[0]
    for r in results:
        r["speedup_vs_dense"] = r["tokens_per_s"] / base["tokens_per_s"]
        if decode:
            r["prefill_speedup_vs_dense"] = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        r["peak_memory_ratio"] = r["peak_memory_bytes"] / base["peak_memory_bytes"]
        r["peak_tensor_ratio"] = r["peak_tensor_bytes"] / max(base["peak_tensor_bytes"], 1)
        r["model_memory_ratio"] = r["model_bytes"] / base["model_bytes"]
    add_limits(results, machine, decode)
    with json_on_stdout(json_out):
        (_print_decode_table if decode else _print_table)(results, common)
        _print_limits(results, machine, common)
    write_json({"settings": common, "kernels": kernel_report, "machine": machine, "results": results}, json_out,
               force)


def add_limits(results: list[dict[str, Any]], machine: dict[str, Any], decode: bool) -> None:
    """Each result against the physical limits, in place. Decode: `stream_fraction` (effective GB/s ÷
    the machine's streaming read GB/s) and `byte_bound` (the baseline's bytes per token ÷ the row's:
    the speedup at equal bandwidth). Forward: `gemm_fraction` (GFLOP/s ÷ the machine's dense GEMM's)
    and `flop_bound` (the baseline's FLOPs per token ÷ the row's). `above_bound`: the speedup exceeds
    the bound by more than `BOUND_SLACK`, so the row streamed (computed) faster than the baseline: a weak baseline,
    or weights that fit in cache — suspicious. None where a count is missing (ONNX)."""
    base = results[0]
    count, rate, limit = ("bytes_per_token", "effective_gbps", "stream_read_gbps") if decode else \
        ("flops_per_token", "gflops", "gemm_gflops")
    for r in results:
        measured = machine.get(limit)
        r["stream_fraction" if decode else "gemm_fraction"] = \
            r[rate] / measured if r[rate] is not None and measured else None
        bound = base[count] / r[count] if base[count] and r[count] else None
        r["byte_bound" if decode else "flop_bound"] = bound
        r["above_bound"] = bound is not None and r["speedup_vs_dense"] > BOUND_SLACK * bound


def _print_table(results: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    from rich import box
    from rich.table import Table

    mem = "peak RSS" if settings["device"] == "cpu" else "peak allocated"
    what = Path(settings["ckpt"]).name if settings["ckpt"] else f"{settings['preset']} s_total={settings['s_total']}"
    table = Table(title=f"chtsl bench {what} — batch {settings['batch']} × seq {settings['seq']}, {settings['device']} "
                        f"{settings['dtype']}, median of {settings['steps']} steps",
                  caption=f"×: ratio to the dense baseline · peak: {mem}",
                  box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)  # fits 80 columns untruncated
    for col in ("model", "backend", "tok/s", "×", "peak MiB", "×", "model MiB", "×"):
        table.add_column(col, justify="left" if col in ("model", "backend") else "right", no_wrap=True,
                         min_width=5 if col == "×" else None)
    for r in results:
        table.add_row(r["model"], _backend_cell(r), f"{r['tokens_per_s']:,.0f}", f"{r['speedup_vs_dense']:.2f}",
                      f"{r['peak_memory_bytes'] / 2**20:,.0f}", f"{r['peak_memory_ratio']:.3f}",
                      f"{r['model_bytes'] / 2**20:,.1f}", f"{r['model_memory_ratio']:.3f}")
    console.print(table)


def _print_decode_table(results: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    from rich import box
    from rich.table import Table

    what = Path(settings["ckpt"]).name if settings["ckpt"] else f"{settings['preset']} s_total={settings['s_total']}"
    table = Table(title=f"chtsl bench --mode decode {what} — batch {settings['batch']}, prompt "
                        f"{settings['prompt_len']} + {settings['new_tokens']} new tokens, {settings['device']} "
                        f"{settings['dtype']}, median of {settings['steps']}",
                  caption="tokens/s · ×: ratio to the dense baseline · latency: per decoded token",
                  box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)  # fits 80 columns untruncated
    for col in ("model", "backend", "prefill/s", "×", "decode/s", "×", "p50 ms", "p90 ms"):
        table.add_column(col, justify="left" if col in ("model", "backend") else "right", no_wrap=True,
                         min_width=5 if col == "×" else None)
    for r in results:
        table.add_row(r["model"], _backend_cell(r), f"{r['prefill_tokens_per_s']:,.0f}",
                      f"{r['prefill_speedup_vs_dense']:.2f}", f"{r['tokens_per_s']:,.1f}",
                      f"{r['speedup_vs_dense']:.2f}", f"{r['latency_p50_s'] * 1e3:,.1f}",
                      f"{r['latency_p90_s'] * 1e3:,.1f}")
    console.print(table)


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _print_limits(results: list[dict[str, Any]], machine: dict[str, Any], settings: dict[str, Any]) -> None:
    """A second small table, each row against the machine (`add_limits`): decode — peak memory, bytes
    per token, the bandwidth that achieved and its share of the streaming read bandwidth; forward —
    FLOPs per token, GFLOP/s and their share of a dense GEMM's; the bound. Then one line per row above
    its bound."""
    from rich import box
    from rich.table import Table

    decode = settings["mode"] == "decode"
    if decode:
        stream = machine.get("stream_read_gbps")
        limit = "–" if stream is None else \
            f"streaming read {stream:.1f} GB/s ({machine['stream_buffer_bytes'] / 2**20:,.0f} MiB buffer)"
        heads = ("peak MiB", "×", "MB/token", "GB/s", "% read", "bound ×")
        keys, scale, spec, kind = ("bytes_per_token", "effective_gbps", "stream_fraction", "byte_bound"), 1e6, ",.1f", \
            "byte"
        mem = "peak RSS" if settings["device"] == "cpu" else "peak allocated"
    else:
        gemm, shape = machine.get("gemm_gflops"), machine.get("gemm_shape")
        limit = "–" if gemm is None else f"dense GEMM {gemm:,.1f} GFLOP/s ({shape[0]}×{shape[1]} · {shape[2]} tokens)"
        heads = ("GFLOP/token", "GFLOP/s", "% GEMM", "bound ×")
        keys, scale, spec, kind = ("flops_per_token", "gflops", "gemm_fraction", "flop_bound"), 1e9, ",.3f", "FLOP"
    times = machine.get("dense_path_s") or {}
    measured = f" ({', '.join(f'{p} {t * 1e3:.2f} ms' for p, t in times.items())} per block)" if times else ""
    caption = (f"{machine['cpu_model']}, {machine['threads']} threads · bound ×: the dense baseline's {kind}s per "
               f"token ÷ the row's · dense linears: {machine['dense_path']}{measured}"
               + (f" · peak: {mem}" if decode else ""))
    table = Table(title=f"against the machine: {limit}", caption=caption, box=box.SIMPLE_HEAD, show_edge=False,
                  collapse_padding=True)
    for col in ("model", "backend", *heads):
        table.add_column(col, justify="left" if col in ("model", "backend") else "right", no_wrap=True,
                         min_width=5 if col == "×" else None)
    for r in results:
        count, rate, fraction, bound = (r.get(k) for k in keys)
        memory = (f"{r['peak_memory_bytes'] / 2**20:,.0f}", f"{r['peak_memory_ratio']:.3f}") if decode else ()
        table.add_row(r["model"], _backend_cell(r), *memory, _fmt(None if count is None else count / scale, spec),
                      _fmt(rate, ",.1f"), _fmt(None if fraction is None else 100 * fraction, ".0f"),
                      _fmt(bound, ".2f") + (" !" if r["above_bound"] else ""))
    console.print(table)
    for r in results:
        if r["above_bound"]:
            console.print(f"suspicious: {r['model']} [{r['backend']}] runs {r['speedup_vs_dense']:.2f}× dense, above "
                          f"its {kind} bound {r[keys[3]]:.2f}×: a weak dense baseline, or weights that fit in cache",
                          markup=False, highlight=False)


def _worker_main(argv: list[str]) -> None:
    """`python -m chtsl_infer.commands.bench SPEC_JSON`: run one configuration, print its report as JSON."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = json.loads(argv[0])
    try:
        report = run_worker(spec)
    except ChtslError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report))


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
