"""Sparse branch of one layer vs the dense layer, for the 60M, 130M and 1B shapes, in one run.

    python benchmarks/kernels.py                              # CPU: C kernel + torch CSR vs dense
    python benchmarks/kernels.py --shapes llama60m --tokens 4096 --density 0.05
    python benchmarks/kernels.py --device cuda                # cuSPARSE (torch CSR) vs cuBLAS
    python benchmarks/kernels.py --device cuda --dtype bfloat16  # as the runtime computes on CUDA

For each shape (gate/up: ffn × hidden; down: hidden × ffn; q: hidden × hidden) and token count T,
times the sparse branch `Y = S X` (feature-major, X (in, T), as the runtime computes it) with S at
`--density` (CHTsL's 5 % at s_total 0.9) against the dense layer `W X` of the same shape (each
writing into its own kept output buffer), interleaving the candidates so machine noise hits them alike.
Prints the median and the best of `--repeats` calls and the ratios dense/candidate (> 1: faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, this file's folder leads sys.path and this file would shadow the `kernels`
# package that transformers probes for at import: drop the folder before importing it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from chtsl_infer import kernels  # noqa: E402
from chtsl_infer.model.presets import get_preset  # noqa: E402

SHAPES = {"llama60m": "llama60m-c4", "llama130m": "llama130m-c4", "llama1b": "llama1b-c4"}


def _time(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per call of every fn, `repeats` rounds interleaved, after one warm-up call each."""
    for fn in fns.values():
        fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - start)
    return times


def _csr(out_f: int, in_f: int, density: float, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    mask = torch.rand(out_f, in_f, generator=gen) < density
    w = torch.randn(out_f, in_f, generator=gen) * mask
    rows, cols = mask.nonzero(as_tuple=True)
    crow = torch.zeros(out_f + 1, dtype=torch.int64)
    crow[1:] = mask.sum(1).cumsum(0)
    return crow.to(torch.int32), cols.to(torch.int16 if in_f <= 32767 else torch.int32), w[rows, cols].contiguous(), w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama60m,llama130m,llama1b")
    ap.add_argument("--tokens", default="1,16,256,4096")
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch + kernel threads [default: torch's]")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="values and activations (half precision: CUDA only; the CPU kernel is fp32)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    if not cuda and dtype != torch.float32:
        ap.error("--dtype bfloat16/float16 needs --device cuda (the CPU kernel and torch's CPU CSR matmul are fp32)")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    print(f"device {device}, {args.dtype}, threads {torch.get_num_threads()}, density {args.density}, "
          f"repeats {args.repeats}")
    print(f"{'shape':<10}{'layer':<11}{'out×in':>12}{'T':>6}{'dense ms':>10}  "
          f"{'candidate':<10}{'median ms':>10}{'best ms':>9}{'× dense (median)':>18}{'× dense (best)':>16}")
    for size in args.shapes.split(","):
        p = get_preset(SHAPES[size])
        layers = {"q_proj": (p.hidden_size, p.hidden_size), "gate_proj": (p.intermediate_size, p.hidden_size),
                  "down_proj": (p.hidden_size, p.intermediate_size)}
        for name, (out_f, in_f) in layers.items():
            crow, col, val, w = _csr(out_f, in_f, args.density, gen)
            for n_tok in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(in_f, n_tok, generator=gen)  # feature-major, as the runtime keeps it
                fns: dict[str, Callable[[], object]] = {}
                if cuda:
                    wd, xd = w.to(device, dtype), x.to(device, dtype)
                    csr = kernels.torch_csr(crow, col, val, (out_f, in_f), device, dtype)
                    fns["dense"] = lambda xd=xd, wd=wd: wd @ xd
                    fns["cusparse"] = lambda xd=xd, csr=csr: kernels.spmm_cuda(xd, csr)
                else:
                    csr = torch.sparse_csr_tensor(crow, col.int(), val, size=(out_f, in_f))
                    # Each writes into its own kept buffer, as the runtime's workspace: a shared one
                    # would hand the next candidate the previous one's dirty lines of Y to flush.
                    out_d, out_s = torch.empty(out_f, n_tok), torch.empty(out_f, n_tok)
                    fns["dense"] = lambda x=x, w=w, out=out_d: torch.mm(w, x, out=out)
                    fns["c-kernel"] = lambda x=x, out=out_s, crow=crow, col=col, val=val: kernels.spmm_cpu(
                        x, crow, col, val, out=out)
                    fns["torch-csr"] = lambda x=x, csr=csr: csr @ x
                times = _time(fns, args.repeats, sync)
                d_med, d_best = statistics.median(times["dense"]), min(times["dense"])
                for k, ts in times.items():
                    if k == "dense":
                        continue
                    med, best = statistics.median(ts), min(ts)
                    print(f"{size:<10}{name:<11}{f'{out_f}×{in_f}':>12}{n_tok:>6}{d_med * 1e3:>10.3f}  "
                          f"{k:<10}{med * 1e3:>10.3f}{best * 1e3:>9.3f}{d_med / med:>18.2f}{d_best / best:>16.2f}",
                          flush=True)


if __name__ == "__main__":
    main()
