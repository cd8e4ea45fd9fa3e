"""Sparse-native training kernels of one layer vs the dense layer's forward + backward, in one run.

    flock /tmp/chtsl-bench.lock python benchmarks/train_kernels.py            # 60M and 130M, 512 tokens
    python benchmarks/train_kernels.py --shapes llama130m --tokens 512,2048 --threads 2 --repeats 15

For each layer shape (q: hidden × hidden, gate: ffn × hidden, down: hidden × ffn) of a preset, S at
the preset's CHTsL density (s_total 0.9; `--density` overrides) and T tokens (token-major
activations, as training holds them), times

    fwd      y = x Sᵀ                 kernels.csr_mm
    dx       dx = dy S                kernels.csr_mm on the transposed structure (values gathered by t_perm)
    dvalues  SDDMM at the links       kernels.csr_sddmm
    csr_linear  the autograd op: forward + backward (dx and dvalues) with its overheads
    torch    the same autograd op through torch's sparse CSR ops (the no-compiler fallback / CUDA path)
    lowrank  the CHTsL low-rank branch B σ(A x) (rank r of the preset) forward + backward
    dense    F.linear(x, W) forward + backward (dx and dW): three GEMMs

interleaved (`--repeats` rounds, the candidates in turn, so machine noise hits them alike). Prints
median (or min) ms and ratio to the dense layer's forward + backward (< 1: cheaper), and the sums
fwd + dx + dvalues and sparse + low-rank (the whole CHTsL layer's linear work).
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
import torch.nn.functional as F  # noqa: E402

from chtsl_infer import kernels  # noqa: E402
from chtsl_infer.kernels import build  # noqa: E402
from chtsl_infer.model.csr import CsrStructure, csr_linear, mask_to_csr  # noqa: E402
from chtsl_infer.model.presets import get_preset  # noqa: E402

SHAPES = {"llama60m": "llama60m-c4", "llama130m": "llama130m-c4", "llama1b": "llama1b-c4"}


def _time(fns: dict[str, Callable[[], object]], repeats: int,
          clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of every fn, `repeats` rounds interleaved, after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = clock()
            fn()
            times[k].append(clock() - start)
    return times


def _fwd_bwd(fn: Callable[[], torch.Tensor], dy: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        fn().backward(dy)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama60m,llama130m")
    ap.add_argument("--tokens", default="512", help="tokens per micro-batch (2 × 256 = 512)")
    ap.add_argument("--density", type=float, default=None, help="[default: the preset's at s_total 0.9]")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: the process's CPU time (all threads; robust to a loaded "
                         "machine's time slicing, but counts OpenMP spin-waits) [wall]")
    ap.add_argument("--stat", choices=("median", "min"), default="median")
    ap.add_argument("--no-torch", action="store_true", help="skip the (slow) torch sparse-op path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ok, how = kernels.cpu_kernel_status()
    gen = torch.Generator().manual_seed(0)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    stat = statistics.median if args.stat == "median" else min
    print(f"threads {torch.get_num_threads()}, repeats {args.repeats}, {args.clock} clock, {args.stat} of the "
          f"repeats, compiled kernels: {ok} ({how})")
    cols = ("fwd", "dx", "dvalues", "sum", "csr_linear", "torch", "lowrank", "sparse+lr")
    print(f"{'shape':<10}{'layer':<10}{'out×in':>10}{'dens':>6}{'T':>6}{'dense ms':>10}  "
          + "".join(f"{c:>14}" for c in cols) + f"   (each: {args.stat} ms, × dense fwd+bwd)")
    for size in args.shapes.split(","):
        p = get_preset(SHAPES[size])
        s, rank = p.split(0.9, "chtsl")
        density = args.density if args.density is not None else 1.0 - s
        layers = {"q_proj": (p.hidden_size, p.hidden_size), "gate_proj": (p.intermediate_size, p.hidden_size),
                  "down_proj": (p.hidden_size, p.intermediate_size)}
        for name, (out_f, in_f) in layers.items():
            mask = torch.rand(out_f, in_f, generator=gen) < density
            st = CsrStructure.from_crow_col(*mask_to_csr(mask), in_f)
            values = (torch.randn(st.nnz, generator=gen) * 0.02).requires_grad_(True)
            w = (torch.randn(out_f, in_f, generator=gen) * 0.02).requires_grad_(True)
            a = (torch.randn(rank, in_f, generator=gen) * 0.02).requires_grad_(True)
            b = (torch.randn(out_f, rank, generator=gen) * 0.02).requires_grad_(True)
            t_perm = st.t_perm.long()
            for n_tok in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(n_tok, in_f, generator=gen).requires_grad_(True)
                dy = torch.randn(n_tok, out_f, generator=gen)
                xd, vd = x.detach(), values.detach()
                fns: dict[str, Callable[[], object]] = {
                    "dense": _fwd_bwd(lambda x=x, w=w: F.linear(x, w), dy),
                    "fwd": lambda xd=xd, vd=vd, st=st: kernels.csr_mm(xd, st.crow, st.col, vd, st.n_rows),
                    "dx": lambda dy=dy, vd=vd, st=st, t_perm=t_perm: kernels.csr_mm(
                        dy, st.t_crow, st.t_row, vd[t_perm], st.n_cols),
                    "dvalues": lambda dy=dy, xd=xd, st=st: kernels.csr_sddmm(dy, xd, st.crow, st.col, st.n_cols),
                    "csr_linear": _fwd_bwd(lambda x=x, values=values, st=st: csr_linear(x, values, st), dy),
                    "lowrank": _fwd_bwd(lambda x=x, a=a, b=b: F.linear(F.silu(F.linear(x, a)), b), dy),
                }
                if not args.no_torch:
                    def torch_path(x=x, values=values, st=st, dy=dy) -> None:
                        saved = build.library
                        build.library = lambda: (None, "torch path")  # force the torch sparse ops
                        try:
                            csr_linear(x, values, st).backward(dy)
                        finally:
                            build.library = saved
                    fns["torch"] = torch_path
                times = {k: stat(v) for k, v in _time(fns, args.repeats, clock).items()}
                times["sum"] = times["fwd"] + times["dx"] + times["dvalues"]
                times["sparse+lr"] = times["csr_linear"] + times["lowrank"]
                dense = times["dense"]
                cells = "".join(f"{times[c] * 1e3:>8.2f} {times[c] / dense:>5.2f}" if c in times else f"{'-':>14}"
                                for c in cols)
                print(f"{size:<10}{name:<10}{f'{out_f}×{in_f}':>10}{density:>6.3f}{n_tok:>6}{dense * 1e3:>10.2f}  "
                      f"{cells}", flush=True)
                x.grad = values.grad = w.grad = a.grad = b.grad = None


if __name__ == "__main__":
    main()
