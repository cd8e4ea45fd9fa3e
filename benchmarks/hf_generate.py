"""transformers' `generate()` on a `from_pretrained` CHTsL model vs the dense Llama of its shape, in one run.

    python benchmarks/hf_generate.py                          # llama60m-c4, s_total 0.9, batch 1, 128 + 64 tokens
    python benchmarks/hf_generate.py --preset llama1b-c4 --dtype bf16 --storage csr
    python benchmarks/hf_generate.py --json hf_generate.json  # the rows as JSON too

What a user runs: `AutoModelForCausalLM.from_pretrained(dir)` then `model.generate(ids, max_new_tokens=N)`,
greedy, under generate()'s own `torch.no_grad()`. The CHTsL model is a training checkpoint
(`save_pretrained` of random weights at `--s-total`, `runtime.random_packed`) in a temporary
directory; `--source packed` loads a packed export instead (`chtsl export`'s format). Rows:

    dense [transformers]     transformers' `LlamaForCausalLM` of the same shape (random weights): the baseline
    <method> [from_pretrained]   the loaded CHTsL model: its forward runs on the runtime (chtsl_infer/runtime/hf.py)
    <method> [stock forward]     the same model with `use_chtsl_runtime = False`: transformers' forward
    <method> [chtsl generate]    `Runtime.generate` of the same directory (`load_runtime`, `auto` backend)

Every row generates exactly `--new-tokens` tokens (no eos: no early stop) for the
same random prompts; rows run interleaved, `--rounds` rounds after a warm-up, so load from other
processes hits them alike. A streamer timestamps each step: prefill = prompt in until the first
new token; decode tokens/s = batch × (new − 1) over the time from the first to the last new token;
generate s = the whole call. Medians over rounds; ratios to the dense row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import chtsl_infer  # noqa: E402, F401  (registers the Auto classes)
from chtsl_infer.formats.model_dir import save_packed  # noqa: E402
from chtsl_infer.formats.packed import unpack_model  # noqa: E402
from chtsl_infer.model.presets import build_config  # noqa: E402
from chtsl_infer.runtime.backends import load_runtime, random_packed  # noqa: E402
from chtsl_infer.utils import torch_dtype  # noqa: E402


class StepClock:
    """A `generate()` streamer that only records when each put arrives (the prompt, then every token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def write_model(directory: Path, preset: str, method: str, s_total: float, storage: str, source: str) -> None:
    """A CHTsL model of random weights in `directory`: a training checkpoint or a packed export."""
    config = build_config(preset, method=method, s_total=s_total, storage=storage)
    packed = random_packed(config, seed=0)
    if source == "packed":
        save_packed(packed, directory / "model.safetensors")
        config.save_pretrained(directory)
    else:
        model = unpack_model(packed, torch.float32)
        del packed
        model.save_pretrained(directory)


def dense_llama(preset: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """transformers' Llama of the preset's shape, random weights (its own initialisation), eval mode."""
    fields = build_config(preset, method="dense").to_dict()
    fields = {k: v for k, v in fields.items() if k not in ("chtsl", "model_type", "transformers_version")}
    return LlamaForCausalLM(LlamaConfig(**fields)).to(dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama60m-c4")
    ap.add_argument("--s-total", type=float, default=0.9)
    ap.add_argument("--method", default="chtsl")
    ap.add_argument("--storage", default="masked", choices=("masked", "csr"))
    ap.add_argument("--source", default="checkpoint", choices=("checkpoint", "packed"))
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch + kernel threads [default: torch's]")
    ap.add_argument("--no-stock", action="store_true", help="skip the stock-forward row (slow at 1B)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode speed is measured between the first and last token)")
    dtype = torch_dtype(args.dtype)

    with tempfile.TemporaryDirectory(prefix="chtsl-hf-bench-") as tmp:
        write_model(Path(tmp), args.preset, args.method, args.s_total, args.storage, args.source)
        chtsl = AutoModelForCausalLM.from_pretrained(tmp, use_safetensors=True, dtype=dtype)
        runtime = load_runtime(tmp, "auto", dtype=dtype)
    dense = dense_llama(args.preset, dtype)
    vocab = dense.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    new = args.new_tokens

    def hf(model, stock: bool = False):
        def run(clock: StepClock) -> torch.Tensor:
            if model is chtsl:
                model.use_chtsl_runtime = not stock
            return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, streamer=clock,
                                  pad_token_id=0)
        return run

    for model in (dense, chtsl):  # exactly `new` tokens everywhere, as Runtime.generate without eos
        model.generation_config.eos_token_id = None
    rows = {"dense [transformers]": hf(dense), f"{args.method} [from_pretrained]": hf(chtsl)}
    if not args.no_stock:
        rows[f"{args.method} [stock forward]"] = hf(chtsl, stock=True)
    rows[f"{args.method} [chtsl generate]"] = lambda clock: runtime.generate(ids, new, streamer=clock)

    print(f"{args.preset} s_total={args.s_total} method={args.method} storage={args.storage} source={args.source} "
          f"{args.dtype}: batch {args.batch}, prompt {args.prompt_len} + {new} new tokens, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds; runtime backend {runtime.backend}")
    outputs = {}
    for name, run in rows.items():  # warm-up: kernel load, the runtime form built once, allocator
        outputs[name] = run(StepClock())
    fast, ours = outputs[f"{args.method} [from_pretrained]"], outputs[f"{args.method} [chtsl generate]"]
    same = torch.equal(fast, ours)
    timings: dict[str, list[tuple[float, float, float]]] = {k: [] for k in rows}
    for _ in range(args.rounds):
        for name, run in rows.items():
            clock = StepClock()
            start = time.perf_counter()
            run(clock)
            total = time.perf_counter() - start
            first, last = clock.times[1], clock.times[-1]
            timings[name].append((first - start, args.batch * (new - 1) / (last - first), total))
    medians = {k: tuple(statistics.median(t[i] for t in v) for i in range(3)) for k, v in timings.items()}
    base = medians["dense [transformers]"]
    print(f"{'model [path]':<30}{'prefill s':>10}{'decode tok/s':>14}{'× dense':>9}{'generate s':>12}{'× dense':>9}")
    report = []
    for name, (prefill, tps, total) in medians.items():
        print(f"{name:<30}{prefill:>10.3f}{tps:>14.1f}{tps / base[1]:>9.2f}{total:>12.3f}{base[2] / total:>9.2f}")
        report.append({"row": name, "prefill_s": prefill, "decode_tokens_per_s": tps, "decode_x_dense": tps / base[1],
                       "generate_s": total, "generate_x_dense": base[2] / total})
    print(f"greedy tokens of [from_pretrained] and [chtsl generate] {'equal' if same else 'DIFFER'}")
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"args": meta, "threads": torch.get_num_threads(), "rows": report,
                                         "same_tokens": same}, indent=2))


if __name__ == "__main__":
    main()
