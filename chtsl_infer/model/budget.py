"""Parameter-budget accounting of docs/method.md §4 (the paper's Eq. 5–7 and Appendix A).

Relative to the dense block linears, a method keeps connectivity density `d_c = 1 − s` and
spectral density `d_l = Σ r·(in+out) / Σ in·out` (sums over the 7 linear types of a block);
its total sparsity is `s_total = 1 − d_c − d_l`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from chtsl_infer.model.layers import LAYER_TYPES, layer_link_count
from chtsl_infer.model.methods import get_method


def linear_shapes(
    hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int | None = None
) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each block linear type of a Llama block."""
    head_dim = hidden_size // num_heads
    kv = (num_kv_heads or num_heads) * head_dim
    h, f = hidden_size, intermediate_size
    return {
        "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
        "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h),
    }


def rank_density(shapes: dict[str, tuple[int, int]]) -> float:
    """d_l contributed by one unit of rank: Σ (in+out) / Σ in·out."""
    return sum(i + o for i, o in shapes.values()) / sum(i * o for i, o in shapes.values())


def rank_step(shapes: dict[str, tuple[int, int]], delta: float = 0.05) -> int:
    """Rank that moves s_total by `delta` (Appendix A): 16 for 60M, 24 for 130M at Δs = 0.05."""
    return round(delta / rank_density(shapes))


def densities(
    shapes: dict[str, tuple[int, int]], method: str, sparsity: dict[str, float], rank: dict[str, int]
) -> tuple[float, float]:
    """(d_c, d_l) of `method` with per-layer-type `sparsity` and `rank` (Eq. 5–6)."""
    m = get_method(method)
    total = sum(i * o for i, o in shapes.values())
    if m.is_dense:
        return 1.0, 0.0
    d_c = sum((1 - sparsity[t]) * i * o for t, (i, o) in shapes.items()) / total if m.has_sparse else 0.0
    d_l = sum(rank[t] * (i + o) for t, (i, o) in shapes.items()) / total if m.has_lowrank else 0.0
    return d_c, d_l


@dataclass(frozen=True)
class LayerBudget:
    """Exact trainable entries of one linear type summed over all blocks."""

    layer_type: str
    in_features: int
    out_features: int
    sparsity: float
    rank: int
    sparse_params: int  # active links of S
    a_params: int
    b_params: int
    dense_params: int  # in·out, the dense Linear it replaces

    @property
    def trainable(self) -> int:
        return self.sparse_params + self.a_params + self.b_params


def layer_budgets(
    shapes: dict[str, tuple[int, int]],
    num_layers: int,
    method: str,
    sparsity: dict[str, float],
    rank: dict[str, int],
    head_dim: int | None = None,
) -> list[LayerBudget]:
    """Per-layer-type exact counts, as the model holds them (links per topology group for q/k/v)."""
    m = get_method(method)
    rows = []
    for t in LAYER_TYPES:
        i, o = shapes[t]
        group = head_dim if t in ("q_proj", "k_proj", "v_proj") else None
        if m.is_dense:
            links = i * o
        else:
            links = layer_link_count(o, i, sparsity[t], group) if m.has_sparse else 0
        r = rank[t] if m.has_lowrank else 0
        rows.append(
            LayerBudget(
                layer_type=t, in_features=i, out_features=o, sparsity=sparsity[t] if m.has_sparse else 0.0, rank=r,
                sparse_params=links * num_layers, a_params=r * i * num_layers, b_params=r * o * num_layers,
                dense_params=i * o * num_layers,
            )
        )
    return rows


def brf_links(out_features: int, in_features: int, sparsity: float) -> int:
    """Links of a layer's BRF mask (docs/method.md §3): round((1 − s)·out·in). BRF gives every node
    of the smaller side at least one, so it needs `min(out, in)` of them."""
    n_small, n_big = min(out_features, in_features), max(out_features, in_features)
    return round((1.0 - sparsity) * n_big * n_small)  # this product order: the masks stay bit-identical


def budget_problems(config: Any) -> list[str]:
    """Why the (sparsity, rank) of a `ChtslConfig` leave the parameter budget, one sentence each;
    empty when they do not. Checked: s_total in [0, 1) and no more trainable linear parameters than
    the dense linears (a rank too large), and, for a method whose masks BRF draws (CHTs topology),
    at least BRF's minimum of links in every layer type (a sparsity too close to 1)."""
    block = config.chtsl
    m = get_method(block["method"])
    shapes = config.linear_shapes()
    rows = layer_budgets(shapes, config.num_hidden_layers, m.name, block["sparsity"], block["rank"], config.head_dim)
    trainable, dense = sum(r.trainable for r in rows), sum(r.dense_params for r in rows)
    s_total = block["s_total"]
    problems = []
    if trainable > dense or s_total < 0:
        problems.append(f"s_total {s_total:.4f} < 0: the linears would train {trainable:,} parameters, more than "
                        f"the dense model's {dense:,} (lower --rank or raise --sparsity)")
    elif s_total >= 1:
        problems.append(f"s_total {s_total:.6f} is not below 1: the linears keep {trainable:,} of {dense:,} "
                        f"parameters (lower --sparsity)")
    if m.topology == "chts":
        short = {t: (brf_links(o, i, block["sparsity"][t]), min(i, o)) for t, (i, o) in shapes.items()}
        short = {t: v for t, v in short.items() if v[0] < v[1]}
        if short:
            most = min(1 - 1 / max(shapes[t]) for t in short)
            layers = ", ".join(f"{t} {links} < {need}" for t, (links, need) in short.items())
            problems.append(f"too few links for BRF, which needs one per node of a layer's smaller side ({layers}): "
                            f"sparsity must be at most {math.floor(most * 1e6) / 1e6:g}")
    return problems
