"""`chtsl plot`: PNGs of a run's metrics.jsonl — loss, validation perplexity, and the OCR grid.

The OCR grid follows the paper's Figure 2: one row per block, columns q, k, v, o; each panel is
that layer's output cancellation ratio over training steps.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from chtsl_infer.errors import ChtslError
from chtsl_infer.utils import atomic_path

OCR_COLUMNS = ("q_proj", "k_proj", "v_proj", "o_proj")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The per-step records of a metrics.jsonl (lines with a `step`; a torn last line of a running
    or killed run is dropped with a warning: `train.checkpoint.read_metrics_log`)."""
    from train.checkpoint import read_metrics_log

    records = [r for r in read_metrics_log(path) if "step" in r]
    if not records:
        raise ChtslError(f"{path} has no step records")
    return records


def _save(fig, path: Path) -> Path:
    """Atomic PNG write: temp file + rename."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    return path


def loss_figure(records: list[dict[str, Any]]):
    """The loss figure: total (solid) and task (dashed) loss; the alignment value on a right axis,
    in the legend (optimised: a line; diagnostic steps of every hybrid method: dots)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    losses = [r for r in records if r.get("loss") is not None]
    steps = [r["step"] for r in losses]
    # Total = task + λ·alignment: solid; task: dashed on top, so both stay visible when they coincide
    # (λ = 0 or methods without the alignment loss).
    aligned = any(r.get("align_loss") for r in losses)
    ax.plot(steps, [r["loss"] for r in losses], color="tab:blue", lw=1.6,
            label="total loss (task + λ·alignment)" if aligned else "total loss (= task loss: no alignment term)")
    ax.plot(steps, [r["task_loss"] for r in losses], color="tab:orange", lw=1.0, ls="--", label="task loss")
    handles, labels = ax.get_legend_handles_labels()
    align_opt = [(r["step"], r["align_loss"]) for r in losses if r.get("align_loss")]
    align_diag = [(r["step"], r["align_value"]) for r in records if r.get("align_value") is not None]
    if align_opt or align_diag:
        ax2 = ax.twinx()
        if align_opt:
            ax2.plot(*zip(*align_opt, strict=True), color="tab:green", lw=0.8,
                     label="alignment Σ_l ||S−L||_F/(B·N) (optimised, right axis)")
        if align_diag:
            ax2.plot(*zip(*align_diag, strict=True), color="tab:green", lw=0, marker=".", ms=5,
                     label="alignment, diagnostic steps" + ("" if align_opt else " (not optimised)") + " (right axis)")
        ax2.set_ylabel("alignment value")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    for r in records:
        if r.get("topology"):
            ax.axvline(r["step"], color="grey", lw=0.5, alpha=0.4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(handles, labels, loc="upper right", fontsize="small")
    ax.set_title("training loss (grey: topology updates)")
    return fig


def plot_run(metrics: Path, out_dir: Path) -> list[Path]:
    """Writes loss.png, val_ppl.png (when evaluated) and ocr.png (when logged) into `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig = loss_figure(records)
    written.append(_save(fig, out_dir / "loss.png"))
    plt.close(fig)

    evals = [r for r in records if r.get("val_ppl") is not None]
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in evals], [r["val_ppl"] for r in evals], marker="o", label="validation ppl")
        uni = evals[-1].get("unigram_ppl")
        if uni:
            ax.axhline(uni, color="grey", ls="--", label=f"unigram ppl {uni:.1f}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("perplexity")
        ax.legend()
        written.append(_save(fig, out_dir / "val_ppl.png"))
        plt.close(fig)

    ocr_records = [r for r in records if r.get("ocr")]
    if ocr_records:
        pattern = re.compile(r"layers\.(\d+)\.\w+\.(\w+)$")
        series: dict[tuple[int, str], list[tuple[int, float]]] = {}
        for r in ocr_records:
            for name, v in r["ocr"].items():
                m = pattern.search(name)
                if m and m.group(2) in OCR_COLUMNS:
                    series.setdefault((int(m.group(1)), m.group(2)), []).append((r["step"], v))
        blocks = sorted({b for b, _ in series})
        if blocks:
            fig, axes = plt.subplots(len(blocks), len(OCR_COLUMNS), figsize=(3 * len(OCR_COLUMNS), 1.8 * len(blocks)),
                                     sharex=True, sharey=True, squeeze=False)
            for i, b in enumerate(blocks):
                for j, col in enumerate(OCR_COLUMNS):
                    ax = axes[i][j]
                    pts = series.get((b, col), [])
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
                    if i == 0:
                        ax.set_title(col.removesuffix("_proj"))
                    if j == 0:
                        ax.set_ylabel(f"block {b}")
            fig.suptitle("output cancellation ratio (OCR) over steps")
            fig.supxlabel("step")
            written.append(_save(fig, out_dir / "ocr.png"))
            plt.close(fig)
    return written
