"""Validation-perplexity and branch-scale curves, and a table of final numbers, for `chtsl train` runs.

    python scripts/fidelity_figures.py chtsl=runs/chtsl chts=runs/chts "lr×0.33=runs/lr0.33" \
        --out docs/fidelity/ablations.png --json ablations.json

Each argument is LABEL=RUN_DIR (a checkpoint directory with metrics.jsonl); runs sharing a label
(LABEL=DIR1 LABEL=DIR2, e.g. two seeds) are drawn as their mean with a min–max band. Prints a
Markdown table (label, seeds, final val ppl per seed and mean, epochs over the training split) used
by docs/fidelity.md. Used for the ablations, which are single runs rather than a `chtsl sweep` grid
(the sweep's report draws its own figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from chtsl_infer.console import iter_jsonl
from train.plot import read_metrics
from train.sweep.plot import seed_band


def run_summary(run: Path) -> dict:
    """Final val ppl, the val curve {step: ppl}, epochs seen and wall time of one run."""
    records = read_metrics(run / "metrics.jsonl")
    start = next((r for _, r in iter_jsonl(run / "metrics.jsonl") if r.get("event") == "start"), {})
    curve = {int(r["step"]): float(r["val_ppl"]) for r in records if r.get("val_ppl") is not None}
    branches = {key: {int(r["step"]): sum(r[key].values()) / len(r[key]) for r in records if r.get(key)}
                for key in ("sparse_rms", "lowrank_rms")}
    args = start.get("args", {})
    rows_seen = records[-1]["step"] * args.get("batch_size", 0)
    return {"run": str(run), "curve": curve, "branches": branches,
            "final": curve[max(curve)] if curve else float("nan"),
            "epochs": rows_seen / start["train_rows"] if start.get("train_rows") else None,
            "steps": records[-1]["step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="validation perplexity")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args()
    groups: dict[str, list[dict]] = {}
    for item in args.runs:
        label, _, path = item.rpartition("=")  # labels may hold "=", paths rarely do
        if not label or not path:
            parser.error(f"expected LABEL=RUN_DIR, got {item!r}")
        groups.setdefault(label, []).append(run_summary(Path(path)))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    cmap = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"]
    for i, (label, runs) in enumerate(groups.items()):
        color = cmap(i % 20)
        steps, mean, lo, hi = seed_band([r["curve"] for r in runs])
        ax.plot(steps, mean, color=color, lw=1.4, marker="o", ms=2.5, label=label)
        if len(runs) > 1:
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15, lw=0)
        for key, style in (("sparse_rms", "-"), ("lowrank_rms", "--")):
            series = [r["branches"][key] for r in runs if r["branches"][key]]
            if series:
                steps, mean, _, _ = seed_band(series)
                bx.plot(steps, mean, color=color, ls=style, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity")
    ax.set_title(args.title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    bx.set_yscale("log")
    bx.set_xlabel("step")
    bx.set_ylabel("RMS per layer output (mean over layers)")
    bx.set_title("branch scales: S x solid, B σ(A x) dashed")
    bx.grid(alpha=0.3, which="both")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)

    print("| run | final val ppl (per seed) | mean | epochs |")
    print("| --- | --- | --- | --- |")
    table = {}
    for label, runs in groups.items():
        finals = [r["final"] for r in runs]
        table[label] = {"final": finals, "mean": statistics.mean(finals), "epochs": runs[0]["epochs"]}
        epochs = f"{runs[0]['epochs']:.2f}" if runs[0]["epochs"] is not None else "?"
        print(f"| {label} | {' / '.join(f'{x:.1f}' for x in finals)} | {statistics.mean(finals):.1f} | {epochs} |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
