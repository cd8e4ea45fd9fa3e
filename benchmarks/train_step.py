"""Training step time, linear-layer training state and peak RSS of every method (and sparse storage)
vs dense, and the topology-update share of wall time.

    python benchmarks/train_step.py [--shapes tiny,llama60m,llama130m] [--methods chtsl]
        [--sparse-storage masked,csr] [--memory] [--device cpu|cuda] [--steps 5] [--repeats 3] [--threads 2]

One training step as `chtsl train` runs it (forward with branch recording and the alignment loss
for chtsl, backward, Adam step, mask re-application for the masked storage), on random tokens, per
configuration (method × sparse storage) and model shape. Configurations are interleaved within each
repeat so that load from other processes hits them alike; the median over repeats is reported as a
ratio to dense measured in the same run.

Columns:
- `× dense`: step time ratio;
- `linear state`: bytes of the block linears' training state — parameters + gradients (one per
  parameter) + the Adam moments actually held by the optimizer — counted from the tensors, as a
  ratio to dense's; `+idx` adds the sparse support (bool masks, or CSR index buffers plus the
  `CsrStructure` forward/transposed indices the kernels use);
- `peak RSS` (with `--memory`): VmHWM of a fresh worker process per configuration that builds the
  model (and, for sparse methods, the BRF masks) and runs warm-up + timed steps — everything a
  training process of that configuration needs, as a ratio to dense's;
- `topology`: one update's time / (update time + update_interval × step time), the share of wall
  time the preset's update schedule costs (interval 100).
Targets (issue 11): CHTsL csr step ≤ 0.7× dense at llama130m; linear state ≤ 0.15× dense;
peak RSS ≤ 0.75× dense at llama130m; topology ≤ 3 %.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Run as a script, Python puts benchmarks/ first on sys.path, where sibling scripts (e.g.
# benchmarks/kernels.py) would shadow installed packages that transformers probes for.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch  # noqa: E402

from chtsl_infer.model.layers import record_branches  # noqa: E402
from chtsl_infer.model.loss import token_nll_sum  # noqa: E402
from chtsl_infer.model.methods import METHODS  # noqa: E402
from chtsl_infer.model.modeling import ChtslLlamaForCausalLM  # noqa: E402
from chtsl_infer.model.presets import build_config, get_preset  # noqa: E402
from chtsl_infer.model.storage import CsrStorage  # noqa: E402
from train.trainer import build_engine, build_optimizer  # noqa: E402

# (micro batch, seq) per shape on CPU; the GPU uses the paper's batch 128 × 256 for llama60m.
CPU_BATCH = {"tiny": (16, 128), "llama60m": (2, 256), "llama130m": (2, 256)}
GPU_BATCH = {"tiny": (64, 128), "llama60m": (128, 256), "llama130m": (64, 256)}
PRESETS = {"tiny": "tiny", "llama60m": "llama60m-c4", "llama130m": "llama130m-c4"}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def configurations(methods: list[str], storages: list[str]) -> list[tuple[str, str]]:
    """(method, storage) pairs: dense first, every sparse method in each storage."""
    out = [("dense", "masked")]
    for m in methods:
        if m == "dense":
            continue
        for s in storages if METHODS[m].has_sparse else ["masked"]:
            if (m, s) not in out:
                out.append((m, s))
    return out


def label(method: str, storage: str) -> str:
    return f"{method} [{storage}]" if METHODS[method].has_sparse else method


def setup(shape: str, method: str, storage: str, device: str):
    preset = get_preset(PRESETS[shape])
    torch.manual_seed(0)
    config = build_config(preset, method=method, s_total=0.9, storage=storage)
    model = ChtslLlamaForCausalLM(config).to(device).train()
    engine = build_engine(model, preset.steps, preset.update_interval)
    opt = build_optimizer(model, 1e-4)
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


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def linear_state_bytes(model: ChtslLlamaForCausalLM, opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(params + grads + Adam moments, sparse support index bytes) of the block linears.

    Gradients are counted at their parameter's size (they exist from backward to the optimizer step,
    the peak of a training step, even though `zero_grad(set_to_none=True)` frees them after)."""
    state = index = 0
    for layer in model.chtsl_layers().values():
        for p in layer.parameters():
            state += 2 * _nbytes(p)
            state += sum(_nbytes(v) for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor) and v.dim())
        for b in layer.buffers():
            index += _nbytes(b)
        if isinstance(layer.storage, CsrStorage):  # + the structure forward and backward index with
            st = layer.storage.structure(layer)
            index += sum(_nbytes(t) for t in (st.crow, st.col, st.t_crow, st.t_row, st.t_perm))
    return state, index


# ----------------------------------------------------------------------------- memory workers


def peak_rss_bytes() -> int:
    """VmHWM of this process (Linux), see chtsl_infer.commands.bench.peak_rss_bytes."""
    from chtsl_infer.commands.bench import peak_rss_bytes as peak

    return peak()


def worker(spec: dict) -> dict:
    """One configuration in this (fresh) process: build, warm-up, `steps` steps; peak RSS."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from chtsl_infer import kernels

    if spec["device"] == "cpu":
        kernels.cpu_kernel_status()  # every worker loads the compiled kernel: same base
    base = peak_rss_bytes()
    _, model, engine, opt, hybrid, align = setup(spec["shape"], spec["method"], spec["storage"], spec["device"])
    b, seq = spec["batch"]
    ids = torch.randint(0, model.config.vocab_size, (b, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(spec["device"])
    for _ in range(1 + spec["steps"]):
        step(model, engine, opt, hybrid, align, ids, spec["device"])
    return {"peak_rss_bytes": peak_rss_bytes(), "base_rss_bytes": base}


def spawn(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,llama60m")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sparse-storage", default="masked,csr",
                    help="storages of the sparse methods' S, comma-separated: masked, csr")
    ap.add_argument("--memory", action="store_true", help="also peak RSS of one worker process per configuration")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)  # progress is visible when piped to a file
    configs = configurations(args.methods.split(","), args.sparse_storage.split(","))
    batch = GPU_BATCH if args.device.startswith("cuda") else CPU_BATCH
    from chtsl_infer import kernels

    print(f"device {args.device}, torch threads {torch.get_num_threads()}, CPU kernels: "
          f"{kernels.cpu_kernel_status()[1] if args.device == 'cpu' else '-'}")
    results: dict[str, list[dict]] = {}
    for shape in args.shapes.split(","):
        b, seq = batch[shape]
        memory: dict[tuple[str, str], dict] = {}
        if args.memory:  # before this process holds the models: workers run alone
            for m, s in configs:
                memory[(m, s)] = spawn({"shape": shape, "method": m, "storage": s, "device": args.device,
                                        "batch": [b, seq], "steps": 1, "threads": args.threads})
        runs = {c: setup(shape, *c, args.device) for c in configs}
        vocab = runs[configs[0]][1].config.vocab_size
        ids = torch.randint(0, vocab, (b, seq), generator=torch.Generator().manual_seed(0)).to(args.device)
        times: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
        for c in configs:  # warm-up
            step(*runs[c][1:], ids, args.device)
        for _ in range(args.repeats):
            for c in configs:
                _sync(args.device)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(*runs[c][1:], ids, args.device)
                _sync(args.device)
                times[c].append((time.perf_counter() - t0) / args.steps)
        med = {c: statistics.median(v) for c, v in times.items()}
        state = {c: linear_state_bytes(runs[c][1], runs[c][3]) for c in configs}
        topo: dict[tuple[str, str], float] = {}
        for c in configs:
            preset, model, engine, opt, *_ = runs[c]
            if engine is None or engine.mode == "static":
                continue
            upd = []
            for k in range(1, 4):
                t0 = time.perf_counter()
                engine.update(k * engine.update_interval, opt)
                _sync(args.device)
                upd.append(time.perf_counter() - t0)
            u = statistics.median(upd)
            topo[c] = u / (u + preset.update_interval * med[c])
        d = configs[0]
        print(f"\n{shape}: micro batch {b} × seq {seq}, step time (median of {args.repeats}×{args.steps} steps)")
        head = f"{'configuration':18s} {'ms/step':>9s} {'× dense':>8s} {'linear state':>13s} {'× dense':>8s} " \
               f"{'+idx × dense':>12s}"
        if args.memory:
            head += f" {'peak RSS':>9s} {'× dense':>8s}"
        print(head + f" {'topology':>9s}")
        rows = []
        for c in configs:
            st, idx = state[c]
            row = {"shape": shape, "method": c[0], "storage": c[1], "step_s": med[c], "step_ratio": med[c] / med[d],
                   "linear_state_bytes": st, "linear_state_ratio": st / state[d][0],
                   "linear_state_with_index_ratio": (st + idx) / (state[d][0] + state[d][1]),
                   "topology_share": topo.get(c)}
            line = (f"{label(*c):18s} {1e3 * med[c]:9.1f} {row['step_ratio']:8.2f} {st / 2**20:10.1f} MiB "
                    f"{row['linear_state_ratio']:8.3f} {row['linear_state_with_index_ratio']:12.3f}")
            if args.memory:
                row["peak_rss_bytes"] = memory[c]["peak_rss_bytes"]
                row["peak_rss_ratio"] = memory[c]["peak_rss_bytes"] / memory[d]["peak_rss_bytes"]
                line += f" {memory[c]['peak_rss_bytes'] / 2**30:6.2f} GiB {row['peak_rss_ratio']:8.2f}"
            line += f" {100 * topo[c]:8.2f}%" if c in topo else f" {'-':>9s}"
            print(line)
            rows.append(row)
        results[shape] = rows
        del runs
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
