"""Figures of a `chtsl sweep` directory (matplotlib PNGs in `DIR/figures/`).

- `ocr_attn.png` / `ocr_mlp.png`: the paper's Figure 2 layout — one column per projection (q, k,
  v, o; gate, up, down), one row per s_total; each panel shows the output cancellation ratio over
  training steps averaged over blocks, one line per method (mean over seeds, band: min–max over
  seeds).
- `cosine_attn.png` / `cosine_mlp.png`: the same for the branch cosine similarity.
- `align_attn.png` / `align_mlp.png`: the same for the alignment value L_align^(l) (logged for every
  hybrid method, optimised only by chtsl).
- `val_ppl.png`: validation perplexity over steps per method (mean over seeds, band: min–max),
  one panel per s_total.
- `branches.png`: per s_total, the two branch outputs' RMS (S x solid, B σ(A x) dashed; mean over
  all hybrid layers) and the gradient norms of the S values, A and B over training, per method
  (mean over seeds).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LAYER_RE = re.compile(r"layers\.(\d+)\.\w+\.(\w+)$")
DIAGNOSTICS = {"ocr": "output cancellation ratio (OCR)", "cosine": "branch cosine similarity",
               "align": "alignment value ||S − L||_F / (B·N)"}


def block_means(records: list[dict[str, Any]], key: str) -> dict[str, dict[int, float]]:
    """{layer type: {step: mean over blocks}} of a per-layer diagnostic (`ocr`, `cosine`, `align`)."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        values = r.get(key)
        if not isinstance(values, dict):
            continue
        per_type: dict[str, list[float]] = {}
        for name, v in values.items():
            m = LAYER_RE.search(name)
            if m and v is not None:
                per_type.setdefault(m.group(2), []).append(float(v))
        for kind, vs in per_type.items():
            out.setdefault(kind, {})[int(r["step"])] = sum(vs) / len(vs)
    return out


def seed_band(series: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over the seeds' series at every step where at least one seed has a value."""
    steps = sorted(set().union(*[s.keys() for s in series])) if series else []
    mean, lo, hi = [], [], []
    for st in steps:
        vals = [s[st] for s in series if st in s]
        mean.append(sum(vals) / len(vals))
        lo.append(min(vals))
        hi.append(max(vals))
    return steps, mean, lo, hi


def _colors(methods: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _save(fig, path: Path) -> Path:
    """Atomic PNG write: temp file + rename."""
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path


def _grid_figure(runs: list, key: str, columns: tuple[str, ...], methods: list[str], s_totals: list[float],
                 colors: dict[str, Any], path: Path) -> Path | None:
    """One row per s_total, one column per projection, one line (+ seed band) per method."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    data: dict[tuple[float, str], list[dict[str, dict[int, float]]]] = {}
    for r in runs:
        means = block_means(r.records, key)
        if means:
            data.setdefault((r.cell.s_total, r.cell.method), []).append(means)
    if not data:
        return None
    rows = [s for s in s_totals if any((s, m) in data for m in methods)]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(3.4 * len(columns), 2.8 * len(rows)),
                             sharex=True, sharey=key != "align", squeeze=False)
    for i, s in enumerate(rows):
        for j, col in enumerate(columns):
            ax = axes[i][j]
            for m in methods:
                seeds = [d[col] for d in data.get((s, m), []) if col in d]
                if not seeds:
                    continue
                steps, mean, lo, hi = seed_band(seeds)
                ax.plot(steps, mean, color=colors[m], lw=1.4, label=m)
                if len(seeds) > 1:
                    ax.fill_between(steps, lo, hi, color=colors[m], alpha=0.18, lw=0)
            if key == "align":
                ax.set_yscale("log")
            if i == 0:
                ax.set_title(col.removesuffix("_proj"))
            if j == 0:
                ax.set_ylabel(f"s_total {s:g}\n{key}")
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", title="method")
    fig.suptitle(f"{DIAGNOSTICS[key]} over training, mean over blocks (line: mean over seeds, band: min–max)")
    fig.supxlabel("step")
    fig.tight_layout(rect=(0, 0, 0.9, 0.95))
    written = _save(fig, path)
    plt.close(fig)
    return written


def _val_figure(runs: list, methods: list[str], s_totals: list[float], colors: dict[str, Any],
                path: Path) -> Path | None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [s for s in s_totals if any(r.cell.s_total == s and any(x.get("val_ppl") for x in r.records) for r in runs)]
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 4), squeeze=False)
    for ax, s in zip(axes[0], rows, strict=True):
        for m in methods:
            series = [{int(x["step"]): float(x["val_ppl"]) for x in r.records  # numbers only: never a "NaN" string
                       if isinstance(x.get("val_ppl"), (int, float)) and not isinstance(x["val_ppl"], bool)}
                      for r in runs if r.cell.s_total == s and r.cell.method == m]
            series = [x for x in series if x]
            if not series:
                continue
            steps, mean, lo, hi = seed_band(series)
            diverged = sum(r.status == "diverged" for r in runs if r.cell.s_total == s and r.cell.method == m)
            label = f"{m} ({len(series)} seeds" + (f", {diverged} diverged)" if diverged else ")")
            ax.plot(steps, mean, color=colors[m], marker="o", ms=3, lw=1.4, label=label)
            if len(series) > 1:
                ax.fill_between(steps, lo, hi, color=colors[m], alpha=0.18, lw=0)
        ax.set_yscale("log")
        ax.set_title(f"s_total {s:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.suptitle("validation perplexity (line: mean over seeds, band: min–max)")
    fig.tight_layout()
    written = _save(fig, path)
    plt.close(fig)
    return written


def _layer_mean(records: list[dict[str, Any]], key: str) -> dict[int, float]:
    """{step: mean over all layers} of a per-layer diagnostic."""
    return {int(r["step"]): sum(r[key].values()) / len(r[key]) for r in records
            if isinstance(r.get(key), dict) and r[key]}


def _branch_figure(runs: list, methods: list[str], s_totals: list[float], colors: dict[str, Any],
                   path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    panels = {  # panel: [(series of one run, line style, label suffix)]
        "branch output RMS": [(lambda rec: _layer_mean(rec, "sparse_rms"), "-", "S x"),
                              (lambda rec: _layer_mean(rec, "lowrank_rms"), "--", "B σ(A x)")],
        "gradient norm": [(lambda rec, k=k: {int(r["step"]): float(r["grad_norms"][k]) for r in rec
                                             if k in r.get("grad_norms", {})}, style, k)
                          for k, style in (("S", "-"), ("A", "--"), ("B", ":"))],
    }
    rows = [s for s in s_totals if any(r.cell.s_total == s and any("grad_norms" in x for x in r.records) for r in runs)]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(6 * len(panels), 3.8 * len(rows)), squeeze=False)
    for i, s in enumerate(rows):
        for j, (title, lines) in enumerate(panels.items()):
            ax = axes[i][j]
            for m in methods:
                for series_of, style, suffix in lines:
                    seeds = [series_of(r.records) for r in runs if r.cell.s_total == s and r.cell.method == m]
                    seeds = [x for x in seeds if x]
                    if seeds:
                        steps, mean, _, _ = seed_band(seeds)
                        ax.plot(steps, mean, color=colors[m], ls=style, lw=1.3, label=f"{m}: {suffix}")
            ax.set_yscale("log")
            ax.set_title(f"s_total {s:g}: {title}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle("branch scales and gradient norms (mean over layers and seeds)")
    fig.tight_layout()
    written = _save(fig, path)
    plt.close(fig)
    return written


def plot_sweep(runs: list, methods: list[str], out_dir: Path) -> list[Path]:
    """Writes the sweep figures (see the module docstring) of `runs` (`train.sweep.runner.RunState`),
    one line per method in the order of `methods`, into `out_dir`; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    s_totals = sorted({r.cell.s_total for r in runs}, reverse=True)
    colors = _colors(methods)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    p = _val_figure(runs, methods, s_totals, colors, out_dir / "val_ppl.png")
    if p:
        written.append(p)
    p = _branch_figure(runs, methods, s_totals, colors, out_dir / "branches.png")
    if p:
        written.append(p)
    for key in DIAGNOSTICS:
        for group, columns in (("attn", ATTN), ("mlp", MLP)):
            p = _grid_figure(runs, key, columns, methods, s_totals, colors, out_dir / f"{key}_{group}.png")
            if p:
                written.append(p)
    return written
