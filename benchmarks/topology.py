"""Cost of one CHTs topology update against 100 training steps, for the 60M, 130M and 1B layer shapes.

    python benchmarks/topology.py                     # CPU, all presets
    python benchmarks/topology.py --device cuda       # GPU (bf16 training matmuls)
    python benchmarks/topology.py --presets llama1b --blocks 2

Update: `TopologyEngine.update` (soft removal, CH2-L3n regrowth, masking) on the block linears of
`--blocks` transformer blocks (default: all of them, except 1 block for 1B on CPU), at the CHTsL
sparsity of s_total = 0.9; the full-model time is that time × num_layers / blocks timed. The best of
`--repeats` updates is reported (the first pays one-off allocation costs).

Training step: measured forward + backward (3 GEMMs per linear) of the *dense-equivalent* block
linears on `--tokens` tokens, scaled linearly to the paper's global batch of 512 × 256 tokens and to
all blocks. Attention scores, embeddings, lm_head and the optimizer are left out, so the real step is
longer and the printed ratio is an upper bound of the update's share of training time.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, this file's folder leads sys.path and the sibling benchmarks/kernels.py would
# shadow the `kernels` package that transformers probes for at import: drop the folder first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from chtsl_infer.model.layers import SparseLowRankLinear  # noqa: E402
from chtsl_infer.model.presets import get_preset  # noqa: E402
from train.topology import TopologyEngine  # noqa: E402

GLOBAL_BATCH_TOKENS = 512 * 256  # docs/method.md §5: 512 sequences of 256 tokens
PRESETS = {"llama60m": "llama60m-c4", "llama130m": "llama130m-c4", "llama1b": "llama1b-c4"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall time (s) of `repeats` calls of `fn`, after one warm-up call."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def block_layers(preset_name: str, blocks: int, device: torch.device) -> dict[str, SparseLowRankLinear]:
    """The sparse block linears of `blocks` blocks of a preset, CHTsL sparsity at s_total 0.9."""
    preset = get_preset(preset_name)
    sparsity, _ = preset.split(0.9)
    head_dim = preset.hidden_size // preset.num_heads
    layers = {}
    for b in range(blocks):
        for kind, (in_f, out_f) in preset.shapes().items():
            rows = head_dim if kind in ("q_proj", "k_proj", "v_proj") else None
            layer = SparseLowRankLinear(in_f, out_f, method="chts", sparsity=sparsity, group_rows=rows)
            layers[f"model.layers.{b}.{kind}"] = layer.to(device)
    return layers


def time_update(preset_name: str, blocks: int, device: torch.device, repeats: int) -> tuple[float, float]:
    """(seconds of one update of `blocks` blocks, mean fraction of the mask changed)."""
    layers = block_layers(preset_name, blocks, device)
    engine = TopologyEngine(layers, total_steps=100_000, update_interval=100, seed=0)
    engine.init_masks()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.normal_(0.0, 0.02, generator=g).mul_(layer.mask)
    step = [0]
    changed = []

    def one_update() -> None:
        step[0] += 100
        changed.append(engine.update(step[0])["frac_changed"])

    return best_time(one_update, device, repeats), sum(changed) / len(changed)


def time_training_step(
    preset_name: str, tokens: int, device: torch.device, repeats: int
) -> tuple[float, float]:
    """(seconds of fwd+bwd of one block's dense linears on `tokens` tokens, achieved GFLOP/s)."""
    preset = get_preset(preset_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = list(preset.shapes().values())
    weights = [torch.randn(o, i, device=device, dtype=dtype, requires_grad=True) for i, o in shapes]
    x = torch.randn(tokens, preset.hidden_size, device=device, dtype=dtype)
    xf = torch.randn(tokens, preset.intermediate_size, device=device, dtype=dtype)

    def fwd_bwd() -> None:
        for (in_f, _), w in zip(shapes, weights, strict=True):
            inp = (x if in_f == preset.hidden_size else xf).requires_grad_(True)
            y = torch.nn.functional.linear(inp, w)
            y.backward(torch.ones_like(y))  # dX and dW: three GEMMs in all
            inp.grad = None
            w.grad = None

    seconds = best_time(fwd_bwd, device, repeats)
    flops = 6 * tokens * sum(i * o for i, o in shapes)
    return seconds, flops / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated subset of: %(default)s")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--blocks", type=int, help="blocks timed (default: all; 1 for 1B on CPU)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of the measured training step")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"training step = measured fwd+bwd of the dense-equivalent block linears on {args.tokens} tokens "
          f"({'bf16' if device.type == 'cuda' else 'fp32'}), scaled to {GLOBAL_BATCH_TOKENS} tokens "
          f"(attention, embeddings, lm_head, optimizer excluded: the ratio is an upper bound)")
    for short in args.presets.split(","):
        name = PRESETS[short]
        preset = get_preset(name)
        n_layers = preset.num_layers
        blocks = args.blocks or (1 if (short == "llama1b" and device.type == "cpu") else n_layers)
        blocks = min(blocks, n_layers)
        update_part, changed = time_update(name, blocks, device, args.repeats)
        update_s = update_part * n_layers / blocks
        block_step, gflops = time_training_step(name, args.tokens, device, args.repeats)
        step_s = block_step * n_layers * GLOBAL_BATCH_TOKENS / args.tokens
        scaled = ""
        if blocks < n_layers:
            scaled = f" (timed {blocks} of {n_layers} blocks, scaled ×{n_layers / blocks:g})"
        print(f"{short:9s} h={preset.hidden_size} f={preset.intermediate_size} L={n_layers}: "
              f"update {update_s:8.2f} s{scaled}, mask changed {changed:.3%}; "
              f"train step {step_s:8.2f} s ({gflops:.0f} GFLOP/s); "
              f"update / 100 steps = {update_s / (100 * step_s):.3%}")


if __name__ == "__main__":
    main()
