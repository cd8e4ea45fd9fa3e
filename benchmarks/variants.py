"""Decoding speed per kernel build variant, several models in one process, rounds interleaved.

    python benchmarks/variants.py                                      # llama60m-c4 int8/bf16/fp32, vw8 vs vw8+g8
    python benchmarks/variants.py --models export-int8/:int8,export-fp32/:fp32 --variants base,g8
    python benchmarks/variants.py --models tiny:fp32 --variants base --rounds 1 --new-tokens 4

Each model (`SOURCE:DTYPE`: a preset, random weights at s_total 0.9, or a packed export / checkpoint
directory; DTYPE fp32, bf16, int8, or int8a8: int8 weights with int8 activations in the sparse
products) is built once on the sparse backend. Then, per round, each model
decodes (prompt `--prompt-len`, then `--new-tokens` greedy tokens with the KV cache, as `chtsl bench
--mode decode`) under each build variant (`table.BUILD_VARIANTS` names joined by "+"; `base`: the
base build; `tuned`: the build this machine's tuning chose), the variants alternating so machine
noise hits them alike. Prints the median decode tokens/s per (model, variant) and its ratio to the
first variant — what a variant gives on this CPU, whatever the tuner decided. A variant that does not
apply to this CPU's base build is refused. Measure on an idle machine (`cat /proc/loadavg`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# Run as a script, Python puts benchmarks/ first on sys.path, where sibling scripts would shadow packages.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from chtsl_infer.commands.bench import _config_for, decode_run  # noqa: E402
from chtsl_infer.kernels import build  # noqa: E402
from chtsl_infer.kernels.table import variant_applies  # noqa: E402
from chtsl_infer.runtime.backends import from_packed, load_packed_any, random_packed  # noqa: E402
from chtsl_infer.utils import PACKED_DTYPES, parse_dtype, torch_dtype  # noqa: E402

CPU = torch.device("cpu")


def build_model(spec: str):  # -> (Runtime, vocab size)
    """`SOURCE:DTYPE` on the sparse backend: a preset's random model at s_total 0.9, or a model directory."""
    source, _, dtype = spec.rpartition(":")
    if not source:
        raise SystemExit(f"--models entry {spec!r} is not SOURCE:DTYPE")
    torch.manual_seed(0)
    if Path(source).exists():
        packed = load_packed_any(source)
    else:
        packed = random_packed(_config_for({"preset": source, "method": "chtsl", "s_total": 0.9}), seed=0)
    vocab = packed.config.vocab_size
    a8 = dtype == "int8a8"
    dtype = torch_dtype(parse_dtype("int8" if a8 else dtype, PACKED_DTYPES))
    return from_packed(packed, "sparse", CPU, dtype, consume=True, int8_activations=a8), vocab


def library(name: str, base: build.Library) -> build.Library:
    if name == "base":
        return base
    if name == "tuned":
        lib = build.current()
        assert lib is not None
        return lib
    if not variant_applies(name, base.probed()):
        raise SystemExit(f"build variant {name!r} does not apply to this CPU's kernels")
    lib, why = build.variant_library(name)
    if lib is None:
        raise SystemExit(f"build variant {name!r} could not be built: {why}")
    return lib


def decode_tokens_per_s(rt, vocab: int, lib: build.Library, prompt: int, new: int) -> float:
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
    with build.use_library(lib):
        _, steps, _ = decode_run(rt, ids, new, CPU)
    return len(steps) / sum(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama60m-c4:int8,llama60m-c4:bf16,llama60m-c4:fp32")
    ap.add_argument("--variants", default="vw8,vw8+g8", help="build variants; the first is the reference")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    base, how = build.library()
    if base is None:
        raise SystemExit(f"no compiled kernels: {how}")
    variants = args.variants.split(",")
    libs = {name: library(name, base) for name in variants}
    models = {spec: build_model(spec) for spec in args.models.split(",")}
    for (rt, vocab) in models.values():  # warm-up: caches, the one-call decoders
        for lib in libs.values():
            decode_tokens_per_s(rt, vocab, lib, args.prompt_len, 2)
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for spec, (rt, vocab) in models.items():
            for name, lib in libs.items():
                samples.setdefault((spec, name), []).append(
                    decode_tokens_per_s(rt, vocab, lib, args.prompt_len, args.new_tokens))

    rows = []
    for spec in models:
        ref = statistics.median(samples[(spec, variants[0])])
        for name in variants:
            median = statistics.median(samples[(spec, name)])
            rows.append({"model": spec, "variant": name, "build": libs[name].variant or "base",
                         "tokens_per_s": median, "ratio": median / ref, "samples": samples[(spec, name)]})
    table = Table(title="decode tokens/s per kernel build variant",
                  caption=f"{build.cpu_model()} · {torch.get_num_threads()} threads · {args.rounds} interleaved "
                          f"rounds · prompt {args.prompt_len} + {args.new_tokens} tokens")
    for col in ("model", "variant", "tok/s", f"× {variants[0]}"):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for r in rows:
        table.add_row(r["model"], r["build"] if r["variant"] == "tuned" else r["variant"],
                      f"{r['tokens_per_s']:.1f}", f"{r['ratio']:.2f}")
    Console(width=80).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
