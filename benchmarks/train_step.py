"""Training step time of every method vs dense, and the topology-update share of wall time.

    python benchmarks/train_step.py [--shapes tiny,llama60m] [--device cpu|cuda] [--steps 5] [--repeats 3]

One training step as `chtsl train` runs it (forward with branch recording and the alignment loss
for chtsl, backward, Adam step, mask re-application), on random tokens, per method and model shape.
Methods are interleaved within each repeat so that load from other processes hits them alike;
the median over repeats is reported as a ratio to dense measured in the same run. The topology
share is `update time / (update_interval × chtsl step time)`, i.e. the fraction of wall time the
preset's update schedule costs. Goal (issue 4): CHTsL step <= 1.35× dense, updates <= 3 %.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# Run as a script, Python puts benchmarks/ first on sys.path, where sibling scripts (e.g.
# benchmarks/kernels.py) would shadow installed packages that transformers probes for.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch  # noqa: E402

from chtsl_infer.layers import record_branches  # noqa: E402
from chtsl_infer.loss import token_nll_sum  # noqa: E402
from chtsl_infer.methods import DEFAULT_METHOD, DENSE, METHODS  # noqa: E402
from chtsl_infer.modeling import ChtslLlamaForCausalLM  # noqa: E402
from chtsl_infer.presets import build_config, get_preset  # noqa: E402
from train.trainer import build_engine  # noqa: E402

# (micro batch, seq) per shape on CPU; the GPU uses the paper's batch 128 × 256 for llama60m.
CPU_BATCH = {"tiny": (16, 128), "llama60m": (2, 256)}
GPU_BATCH = {"tiny": (64, 128), "llama60m": (128, 256)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def setup(shape: str, method: str, device: str):
    preset = get_preset("tiny" if shape == "tiny" else "llama60m-c4")
    torch.manual_seed(0)
    model = ChtslLlamaForCausalLM(build_config(preset, method=method, s_total=0.9)).to(device).train()
    engine = build_engine(model, preset.steps, preset.update_interval)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    hybrid = {n: m for n, m in model.chtsl_layers().items() if m.has_sparse and m.has_lowrank}
    return preset, model, engine, opt, hybrid, set(model.align_layers())


def step(model, engine, opt, hybrid, align, ids, device) -> None:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    with record_branches(hybrid, align=align) as rec, autocast:
        logits = model(input_ids=ids).logits
        nll, n = token_nll_sum(logits, ids)
        loss = nll / n
        a = rec.alignment()
        if a is not None:
            loss = loss + 0.3 * a
    loss.backward()
    opt.step()
    if engine is not None:
        engine.apply_masks(opt)
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,llama60m")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per method per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)  # progress is visible when piped to a file
    methods = args.methods.split(",")
    if DENSE not in methods:
        methods.insert(0, DENSE)
    batch = GPU_BATCH if args.device.startswith("cuda") else CPU_BATCH
    print(f"device {args.device}, torch threads {torch.get_num_threads()}")
    for shape in args.shapes.split(","):
        b, seq = batch[shape]
        runs = {m: setup(shape, m, args.device) for m in methods}
        vocab = runs[DENSE][1].config.vocab_size
        ids = torch.randint(0, vocab, (b, seq), generator=torch.Generator().manual_seed(0)).to(args.device)
        times: dict[str, list[float]] = {m: [] for m in methods}
        for m in methods:  # warm-up
            step(*runs[m][1:], ids, args.device)
        for _ in range(args.repeats):
            for m in methods:
                _sync(args.device)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(*runs[m][1:], ids, args.device)
                _sync(args.device)
                times[m].append((time.perf_counter() - t0) / args.steps)
        med = {m: statistics.median(v) for m, v in times.items()}
        print(f"\n{shape}: micro batch {b} × seq {seq}, step time (median of {args.repeats}×{args.steps} steps)")
        print(f"{'method':10s} {'ms/step':>10s} {'× dense':>8s} {'tokens/s':>10s}")
        for m in methods:
            print(f"{m:10s} {1e3 * med[m]:10.1f} {med[m] / med['dense']:8.2f} {b * seq / med[m]:10,.0f}")
        preset, model, engine, opt, *_ = runs.get(DEFAULT_METHOD, runs[methods[-1]])
        if engine is not None and engine.mode != "static":
            upd = []
            for k in range(1, 4):
                t0 = time.perf_counter()
                engine.update(k * engine.update_interval, opt)
                _sync(args.device)
                upd.append(time.perf_counter() - t0)
            u = statistics.median(upd)
            share = u / (u + preset.update_interval * med[DEFAULT_METHOD])
            print(f"topology update {1e3 * u:.1f} ms every {preset.update_interval} steps → {100 * share:.2f} % "
                  f"of wall time")


if __name__ == "__main__":
    main()
