"""`chtsl info`: the per-layer-type parameter budget of a preset (docs/method.md §4) and the bytes its
packed exports hold per link of S and read per decoded token (docs/formats.md §2); with `--kernels`,
the CPU kernels (build, ISA, the settings in force and their tuning)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table

from chtsl_infer.model import budget
from chtsl_infer.model.configuration import ChtslConfig
from chtsl_infer.model.methods import get_method

#: The packed exports `chtsl info` sizes: each `--dtype` with its default index encoding, as
#: (dtype, value bytes, bytes of the float tensors (embeddings, norms), delta8 columns).
PACKED_KINDS = (("fp32", 4, 4, False), ("bf16", 2, 2, True), ("int8", 1, 2, True))


def budget_report(config: ChtslConfig, preset: str | None = None) -> dict[str, Any]:
    """Exact parameter counts of `config`'s linears and its s_total, d_c, d_l, rank step, and
    `problems`: why its (s, r) leave the budget (`budget.budget_problems`; `chtsl train` refuses
    such a config), empty when they do not."""
    block = config.chtsl
    shapes = config.linear_shapes()
    rows = budget.layer_budgets(
        shapes, config.num_hidden_layers, block["method"], block["sparsity"], block["rank"], config.head_dim
    )
    dense = sum(r.dense_params for r in rows)
    trainable = sum(r.trainable for r in rows)
    h, v, n = config.hidden_size, config.vocab_size, config.num_hidden_layers
    other = v * h * (1 if config.tie_word_embeddings else 2) + (2 * n + 1) * h  # embeddings, lm_head, norms
    return {
        "preset": preset,
        "method": block["method"],
        "packed": packed_sizes(config, rows),
        "activation": block["activation"],
        "s_total": block["s_total"],
        "d_c": block["d_c"],
        "d_l": block["d_l"],
        "rank_step": budget.rank_step(shapes),
        "problems": budget.budget_problems(config),
        # the preset's recipe value for this method (docs/method.md §5), 1 = CoLA's σ0
        "lowrank_init_scale": float(block.get("lowrank_init_scale", 1.0)),
        "layers": [
            {
                "type": r.layer_type, "in_features": r.in_features, "out_features": r.out_features,
                "sparsity": r.sparsity, "rank": r.rank, "sparse_params": r.sparse_params, "a_params": r.a_params,
                "b_params": r.b_params, "trainable_params": r.trainable, "dense_params": r.dense_params,
            }
            for r in rows
        ],
        "totals": {
            "dense_linear_params": dense,
            "trainable_linear_params": trainable,
            "linear_param_ratio": trainable / dense,
            "other_params": other,
            "model_trainable_params": trainable + other,
        },
    }


def budget_table(report: dict[str, Any]) -> Table:
    """Rich table of `budget_report`: one row per layer type, totals in the caption."""
    title = f"{report['preset'] or 'config'} · {report['method']} · s_total {report['s_total']:.4f}"
    # Borderless, one space between columns: the largest preset (llama1b) fits 80 columns untruncated.
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False)
    for col in ("layer", "shape\n(out×in)", "s", "r", "S\nparams", "A\nparams", "B\nparams", "dense\nparams"):
        table.add_column(col, justify="left" if col in ("layer", "shape\n(out×in)") else "right", no_wrap=True)
    for r in report["layers"]:
        table.add_row(
            r["type"], f"{r['out_features']}×{r['in_features']}", f"{r['sparsity']:.3f}", str(r["rank"]),
            f"{r['sparse_params']:,}", f"{r['a_params']:,}", f"{r['b_params']:,}", f"{r['dense_params']:,}",
        )
    t = report["totals"]
    table.caption = (
        f"dense linear params {t['dense_linear_params']:,} · trainable linear params "
        f"{t['trainable_linear_params']:,} ({t['linear_param_ratio']:.3f}×) · s_total {report['s_total']:.4f} · "
        f"d_c : d_l = {report['d_c']:.4f} : {report['d_l']:.4f} · rank step {report['rank_step']} · "
        f"embeddings+lm_head+norms {t['other_params']:,}"
    )
    if any(r["rank"] for r in report["layers"]):
        table.caption += f" · low-rank init × {report['lowrank_init_scale']:g} (CoLA's σ0)"
    return table


def packed_sizes(config: ChtslConfig, rows: list[budget.LayerBudget]) -> list[dict[str, Any]]:
    """Per `PACKED_KINDS` export of `config` (layer budgets `rows`): bytes per link of S (values, column
    indices, row pointers, int8 row scales; padding links of 8-bit deltas, ≈ 2·10⁻⁶ of them at 5 %
    density, left out) and bytes read per decoded token (every linear, the lm_head, the norms, one
    embedding row), and that as a fraction of the dense fp32 model's."""
    method = get_method(config.chtsl["method"])
    n, h, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    dense_fp32 = 4 * (sum(r.dense_params for r in rows) + vocab * h * (1 if config.tie_word_embeddings else 2)
                      + (2 * n + 1) * h)
    out = []
    for name, value, floats, delta in PACKED_KINDS:
        scale = 4 if name == "int8" else 0  # one fp32 scale per row of an int8 matrix
        s_bytes = links = linears = 0
        for r in rows:
            if method.is_dense:
                linears += r.dense_params * value + scale * r.out_features * n
                continue
            if r.sparse_params:
                index = 1 if delta else 2 if r.in_features <= 32767 else 4
                part = r.sparse_params * (value + index) + (4 + scale) * r.out_features * n + 4 * n
                s_bytes, links, linears = s_bytes + part, links + r.sparse_params, linears + part
            linears += (r.a_params + r.b_params) * value + scale * (r.rank + r.out_features) * n * bool(r.rank)
        head = vocab * h * floats if config.tie_word_embeddings else vocab * h * value + scale * vocab
        token = linears + head + (2 * n + 1) * h * floats + h * floats
        out.append({"dtype": name, "index": "delta8" if delta else "absolute",
                    "bytes_per_link": s_bytes / links if links else None, "bytes_per_token": token,
                    "dense_fp32_fraction": token / dense_fp32})
    return out


def packed_table(report: dict[str, Any]) -> Table:
    """Rich table of `budget_report`'s `packed` rows: bytes per link and per decoded token by --dtype."""
    table = Table(title="packed export · bytes a decoded token reads", box=box.SIMPLE_HEAD, padding=(0, 1),
                  show_edge=False)
    for col in ("--dtype", "columns", "bytes/link", "MB/token", "× dense fp32"):
        table.add_column(col, justify="left" if col in ("--dtype", "columns") else "right", no_wrap=True)
    for r in report["packed"]:
        per_link = "-" if r["bytes_per_link"] is None else f"{r['bytes_per_link']:.2f}"
        table.add_row(r["dtype"], r["index"], per_link, f"{r['bytes_per_token'] / 1e6:,.1f}",
                      f"{r['dense_fp32_fraction']:.3f}")
    table.caption = "every weight once + one embedding row; KV cache and activations not counted"
    return table


# ----------------------------------------------------------------------------- chtsl info --kernels


def kernel_report(retune: bool = False) -> dict[str, Any]:
    """`kernels.kernel_info()` as JSON (the kernels built and tuned on first use), after tuning anew with
    `retune`; plus the values the tuner tries per setting (`candidates`) and the build variants it may
    combine on this CPU (`variants`)."""
    from chtsl_infer import kernels
    from chtsl_infer.kernels import build, tune
    from chtsl_infer.kernels.table import BUILD_VARIANTS

    tune.enabled(), tune.budget()  # ChtslError on a bad CHTSL_TUNE / CHTSL_TUNE_BUDGET, even when tuned already
    if retune:
        tune.retune()
    info = kernels.kernel_info().as_json()
    base = build.library()[0]  # the variants apply to the base build (a variant's own probe differs)
    variants = [name for name, spec in BUILD_VARIANTS.items() if base is not None and spec.applies(base.probed())]
    return {**info, "candidates": {k: list(v) for k, v in tune.CANDIDATES.items()}, "variants": variants}


def _tuning_lines(tuning: dict[str, Any]) -> list[tuple[str, str]]:
    record = tuning.get("record")
    if not record:
        return [("settings", f"{tuning['state']}: {tuning['detail']}")]
    done = "complete" if record["complete"] else "stopped at the budget"
    if record.get("under_load"):
        done += (f", under load: others took {100 * record['others_cpu_share']:.0f} % of the CPUs; tuned anew when "
                 "the machine is idle")
    return [("settings", f"{tuning['state']}: measured {record['measured_at']} in {record['seconds']:.1f} s "
                         f"({record['key']['threads']} threads, {done})"),
            ("cache", str(tuning["path"]))]


def kernel_table(report: dict[str, Any]) -> Group:
    """What `kernel_report` holds, for the console: the CPU, ISA, build and tuning as key/value lines, then
    one row per setting (in force, default, the values the tuner tries; * = tuned away from the
    default) and the build variant."""
    about = Table.grid(padding=(0, 2))
    about.add_column(style="bold")
    about.add_column(overflow="fold")
    about.add_row("CPU", report["cpu"])
    if not report["available"]:
        about.add_row("kernels", f"not compiled: {report['detail']}")
        return Group(about)
    about.add_row("ISA", f"{' '.join(report['isa']) or 'none of those the kernels use'} (tile vectors "
                         f"{report['tile_vw']} floats, bf16 dot {'on' if report['bf16_dot'] else 'off'}, int8 "
                         f"activations {'VBMI/VNNI' if report['a8_vector'] else 'plain C'})")
    about.add_row("build", f"{report['compiler']} {' '.join(report['flags'])} · {report['path']}")
    for key, value in _tuning_lines(report["tuning"]):
        about.add_row(key, value)
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False,
                  caption="* tuned on this machine · CHTSL_TUNE=0: the defaults · --retune: tune anew")
    for col in ("setting", "in force", "default", "tried"):
        table.add_column(col, justify="left" if col in ("setting", "tried") else "right", no_wrap=col != "tried")
    defaults = report["defaults"]
    for name, value in report["settings"].items():
        mark = " *" if value != defaults[name] else ""
        tried = ", ".join(str(v) for v in report["candidates"].get(name, []))
        table.add_row(name, f"{value}{mark}", str(defaults[name]), tried)
    table.add_row("build variant", (report["variant"] or "base") + (" *" if report["variant"] else ""), "base",
                  ", ".join(["base", *report["variants"]]))
    return Group(about, table)

