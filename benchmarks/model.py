"""Whole-model inference ratios vs the dense model of the same shape, measured in one run.

    python benchmarks/model.py                                  # llama60m-c4, s_total 0.9, CPU
    python benchmarks/model.py --preset llama130m-c4 --batch 16 --seq 256
    python benchmarks/model.py --memory                         # + peak RSS, one fresh worker each

Throughput: the dense model (method `dense`, `dense` backend; also through transformers' own
forward, `[transformers]`), the CHTsL model on the `sparse` backend and on the `dense` backend (S
densified) are built in this process from random weights
(`runtime.random_packed`) and timed *interleaved* — one full forward (logits at every position,
no KV cache) of each per round, `--rounds` rounds after a warm-up — so load from other processes
hits all of them alike; the median per model gives tokens/s and the ratio to dense.
Resident memory: bytes of each model's parameters and buffers (the packed size for `sparse`).
Peak memory (`--memory`): `chtsl bench`'s worker per configuration (a fresh process): peak RSS
over its forwards (includes Python, torch, the kernel; varies by tens of MiB from run to run on
this VM) and peak live tensor bytes (`bench.peak_tensor_bytes`: deterministic, as CUDA's
`max_memory_allocated`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from chtsl_infer.model.configuration import ChtslConfig  # noqa: E402
from chtsl_infer.model.modeling import ChtslLlamaForCausalLM  # noqa: E402
from chtsl_infer.model.presets import build_config  # noqa: E402
from chtsl_infer.runtime.backends import from_packed, random_packed, resident_bytes  # noqa: E402


class StockForward:
    """The dense model as plain transformers runs it (`nn.Linear` layers, token-major forward):
    shows that the runtime's feature-major path does not handicap the dense baseline."""

    def __init__(self, config: ChtslConfig) -> None:
        self.model = ChtslLlamaForCausalLM(config).eval()
        self.model_bytes = resident_bytes(self.model)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.model(input_ids=ids, use_cache=False).logits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama60m-c4")
    ap.add_argument("--s-total", type=float, default=0.9)
    ap.add_argument("--method", default="chtsl")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS in fresh workers")
    ap.add_argument("--threads", type=int, default=None, help="torch + kernel threads [default: torch's]")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {
        "dense model [dense]": from_packed(random_packed(build_config(args.preset, method="dense")), "dense"),
        f"{args.method} [sparse]": from_packed(
            random_packed(build_config(args.preset, method=args.method, s_total=args.s_total)), "sparse"),
    }
    models[f"{args.method} [dense]"] = from_packed(
        random_packed(build_config(args.preset, method=args.method, s_total=args.s_total)), "dense")
    models["dense model [transformers]"] = StockForward(build_config(args.preset, method="dense"))
    vocab = models["dense model [dense]"].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.seq
    print(f"{args.preset} s_total={args.s_total} method={args.method}: batch {args.batch} × seq {args.seq} "
          f"= {tokens} tokens/forward, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    out = torch.empty(args.batch, args.seq, vocab)  # one logits buffer for all, as a serving loop would
    for rt in models.values():  # warm-up (kernel build/load, workspace)
        rt.logits(ids, out=out)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for name, rt in models.items():
            start = time.perf_counter()
            rt.logits(ids, out=out)
            times[name].append(time.perf_counter() - start)
    base_t = statistics.median(times["dense model [dense]"])
    base_b = models["dense model [dense]"].model_bytes
    print(f"{'model [backend]':<28}{'median s':>10}{'best s':>9}{'tokens/s':>11}{'× dense':>9}"
          f"{'best × dense':>14}{'resident MiB':>14}{'× dense':>9}")
    best_base = min(times["dense model [dense]"])
    for name, rt in models.items():
        med, best = statistics.median(times[name]), min(times[name])
        print(f"{name:<28}{med:>10.3f}{best:>9.3f}{tokens / med:>11,.0f}{base_t / med:>9.2f}{best_base / best:>14.2f}"
              f"{rt.model_bytes / 2**20:>14.1f}{rt.model_bytes / base_b:>9.3f}")
    if args.memory:
        del models
        from chtsl_infer.commands.bench import _spawn

        common = {"batch": args.batch, "seq": args.seq, "steps": 1, "warmup": 1, "device": "cpu",
                  "dtype": "float32", "preset": args.preset, "s_total": args.s_total, "ckpt": None}
        rows = [("dense model [dense]", "dense", "dense"), (f"{args.method} [sparse]", args.method, "sparse")]
        reports = {}
        for label, method, backend in rows:
            reports[label] = _spawn({**common, "label": label, "method": method, "backend": backend}, timeout=None)
        base = reports["dense model [dense]"]
        print(f"{'model [backend]':<28}{'peak RSS MiB':>14}{'× dense':>9}{'saved MiB':>11}"
              f"{'peak tensors MiB':>18}{'× dense':>9}{'saved MiB':>11}")
        for label, r in reports.items():
            rss, rss0 = r["peak_memory_bytes"], base["peak_memory_bytes"]
            ten, ten0 = r["peak_tensor_bytes"], base["peak_tensor_bytes"]
            print(f"{label:<28}{rss / 2**20:>14.1f}{rss / rss0:>9.3f}{(rss0 - rss) / 2**20:>11.1f}"
                  f"{ten / 2**20:>18.1f}{ten / ten0:>9.3f}{(ten0 - ten) / 2**20:>11.1f}")


if __name__ == "__main__":
    main()
