"""The CHTs topology engine (docs/method.md §3, issue 3): BRF, CH2-L3n, removal, regrowth, engine, DDP."""

from __future__ import annotations

import json
import math
import socket
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from scipy import stats

from chtsl_infer.model.layers import SparseLowRankLinear, link_count
from train.topology import (
    TopologyEngine,
    brf_mask,
    ch2_l3n_scores,
    regrow_links,
    removal_keep_counts,
    soft_removal,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ring_distance(j: int, centre: int, n: int) -> int:
    return min(abs(j - centre), n - abs(j - centre))


def small_side_view(mask: torch.Tensor) -> torch.Tensor:
    """The mask as (small side × big side), the orientation BRF reasons in."""
    return mask if mask.shape[0] <= mask.shape[1] else mask.T


# ----------------------------------------------------------------------------- BRF


@pytest.mark.parametrize("shape", [(8, 20), (20, 8), (16, 16), (5, 37), (37, 5), (1, 7), (7, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("randomness", [0.0, 0.25, 1.0])
def test_brf_link_count_and_min_degree(shape: tuple[int, int], sparsity: float, randomness: float) -> None:
    out_f, in_f = shape
    mask = brf_mask(out_f, in_f, sparsity, randomness, gen(3))
    assert mask.dtype == torch.bool and mask.shape == shape
    assert int(mask.sum()) == round((1 - sparsity) * out_f * in_f)
    assert int(small_side_view(mask).sum(1).min()) >= 1


def test_brf_rejects_fewer_links_than_nodes() -> None:
    with pytest.raises(ValueError):
        brf_mask(10, 10, 0.95, 0.0, gen(0))  # 5 links for 10 nodes


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32), (10, 33), (33, 10)])
def test_brf_r0_is_a_band_around_the_scaled_diagonal_and_seed_independent(shape: tuple[int, int]) -> None:
    mask = brf_mask(*shape, 0.8, 0.0, gen(0))
    assert torch.equal(mask, brf_mask(*shape, 0.8, 0.0, gen(12345)))
    view = small_side_view(mask)
    n_small, n_big = view.shape
    stride = max(1, n_big // n_small)
    degrees = view.sum(1)
    assert int(degrees.max() - degrees.min()) <= 1  # r = 0: balanced degrees
    for i in range(n_small):
        centre = (i * stride) % n_big
        k = int(degrees[i])
        # nearest first: centre, +1, -1, +2, -2, ... (forward first at equal distance)
        order = [centre] + [(centre + s * d) % n_big for d in range(1, n_big) for s in (1, -1)]
        expected: list[int] = []
        for j in order:
            if j not in expected:
                expected.append(j)
        assert set(torch.nonzero(view[i]).flatten().tolist()) == set(expected[:k]), i
        assert max(ring_distance(j, centre, n_big) for j in expected[:k]) <= math.ceil(k / 2)


def distance_histogram(mask: torch.Tensor) -> tuple[list[int], list[float]]:
    """Observed link counts per ring distance from the node's centre, and the uniform expectation."""
    view = small_side_view(mask)
    n_small, n_big = view.shape
    stride = max(1, n_big // n_small)
    half = n_big // 2
    observed = [0] * (half + 1)
    for i, j in torch.nonzero(view).tolist():
        observed[ring_distance(j, (i * stride) % n_big, n_big)] += 1
    positions_at = [sum(1 for j in range(n_big) if ring_distance(j, 0, n_big) == d) for d in range(half + 1)]
    total = int(view.sum())
    return observed, [total * p / n_big for p in positions_at]


@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
def test_brf_r1_spreads_uniformly(shape: tuple[int, int]) -> None:
    mask = brf_mask(*shape, 0.9, 1.0, gen(7))
    big_side_counts = small_side_view(mask).sum(0).double()
    chi_columns = stats.chisquare(big_side_counts.numpy())  # equal expected counts
    assert chi_columns.pvalue > 1e-3
    observed, expected = distance_histogram(mask)
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    # The same distance test has the power to reject a local (r = 0.25) BRF.
    observed, expected = distance_histogram(brf_mask(*shape, 0.9, 0.25, gen(7)))
    assert stats.chisquare(observed, expected).pvalue < 1e-6


def test_brf_locality_decreases_with_randomness() -> None:
    def mean_distance(r: float) -> float:
        observed, _ = distance_histogram(brf_mask(48, 192, 0.9, r, gen(1)))
        return sum(d * c for d, c in enumerate(observed)) / sum(observed)

    means = [mean_distance(r) for r in (0.0, 0.25, 0.5, 1.0)]
    assert means == sorted(means) and means[0] < means[-1] / 4


def test_brf_r_positive_depends_on_seed() -> None:
    assert not torch.equal(brf_mask(16, 48, 0.8, 0.25, gen(0)), brf_mask(16, 48, 0.8, 0.25, gen(1)))


# ----------------------------------------------------------------------------- CH2-L3n


def brute_force_ch2_l3n(mask: torch.Tensor) -> list[list[Fraction]]:
    """CH2-L3n from its node-level definition, with explicit loops over nodes and exact fractions.

    For a missing link u–j: over the output nodes v already linked to j, add (c+1)/(e+1) where
    c = number of inputs u and v share and e = max(deg(v) − c, 1) − 1 (v's links outside the shared
    community, less one), when c > 0; symmetrically over the inputs b already linked to u, with
    c = number of outputs j and b share and e from deg(b).
    """
    n_out, n_in = mask.shape
    rows = [{b for b in range(n_in) if mask[u, b]} for u in range(n_out)]
    cols = [{v for v in range(n_out) if mask[v, j]} for j in range(n_in)]
    scores = [[Fraction(0)] * n_in for _ in range(n_out)]
    for u in range(n_out):
        for j in range(n_in):
            if mask[u, j]:
                continue
            total = Fraction(0)
            for v in cols[j]:  # output-side paths u - (shared inputs) - v - j
                shared = len(rows[u] & rows[v])
                if shared:
                    total += Fraction(shared + 1, max(len(rows[v]) - shared, 1))
            for b in rows[u]:  # input-side paths u - b - (shared outputs) - j
                shared = len(cols[j] & cols[b])
                if shared:
                    total += Fraction(shared + 1, max(len(cols[b]) - shared, 1))
            scores[u][j] = total
    return scores


def random_masks() -> list[torch.Tensor]:
    shapes = [(3, 4), (4, 3), (5, 5), (6, 9), (9, 6), (7, 12), (12, 7), (8, 8), (10, 15), (15, 10), (2, 11)]
    densities = [0.05, 0.1, 0.2, 0.35, 0.5, 0.7]
    g = gen(2024)
    masks = []
    for repeat in range(2):  # each shape twice, at two different densities
        for i, shape in enumerate(shapes):
            density = densities[i % len(densities)] if repeat == 0 else densities[-1 - i % len(densities)]
            masks.append(torch.rand(shape, generator=g) < density)
    masks += [
        torch.zeros(4, 6, dtype=torch.bool),
        torch.ones(4, 6, dtype=torch.bool),
        torch.eye(6, dtype=torch.bool),
        brf_mask(8, 14, 0.6, 0.0, gen(0)),
        brf_mask(14, 8, 0.6, 0.5, gen(0)),
    ]
    single = torch.zeros(5, 7, dtype=torch.bool)
    single[2, 3] = True
    return [*masks, single]


def test_ch2_l3n_equals_brute_force() -> None:
    masks = random_masks()
    assert len(masks) >= 20
    for mask in masks:
        got = ch2_l3n_scores(mask)
        assert got.dtype == torch.float32 and got.shape == mask.shape
        expected = torch.tensor([[float(x) for x in row] for row in brute_force_ch2_l3n(mask)])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0.0)
        assert torch.all(got[mask] == 0)


def test_ch2_l3n_structure_kernel_equals_dense_products() -> None:
    """The CPU structure kernel (`csrc/ch_scores.c`) against the dense float64 products, on random
    and BRF masks, including empty rows/columns and a full mask."""
    from chtsl_infer import kernels
    from train.topology import ch2_l3n_scores_dense

    if not kernels.cpu_kernel_status()[0]:
        pytest.skip("no C compiler: ch2_l3n_scores uses the dense products")
    g = gen(7)
    masks = [torch.rand(s, generator=g) < d for s, d in (((96, 40), 0.05), ((40, 96), 0.1), ((64, 64), 0.3))]
    masks += [brf_mask(48, 128, 0.9, r, g) for r in (0.0, 0.25)] + [torch.ones(5, 7, dtype=torch.bool)]
    masks[0][3] = False
    masks[0][:, 5] = False
    for mask in masks:
        dense = ch2_l3n_scores_dense(mask)
        torch.testing.assert_close(ch2_l3n_scores(mask), dense, rtol=1e-6, atol=0.0)


def test_ch2_l3n_is_symmetric_in_the_two_sides() -> None:
    mask = torch.rand(9, 13, generator=gen(5)) < 0.3
    torch.testing.assert_close(ch2_l3n_scores(mask.T), ch2_l3n_scores(mask).T, rtol=1e-6, atol=0.0)


def test_ch2_l3n_equal_scores_are_bitwise_equal() -> None:
    # A circulant band: every missing link at the same offset from the band has the same score.
    mask = brf_mask(24, 24, 0.75, 0.0, gen(0))
    scores = ch2_l3n_scores(mask)
    shifted = torch.roll(torch.roll(scores, 1, 0), 1, 1)
    assert torch.equal(scores, shifted)


# ----------------------------------------------------------------------------- removal


@pytest.mark.parametrize("zeta_t", [0.0, 0.05, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 9.0, None])
def test_removal_keeps_the_scheduled_count_per_group(zeta_t: float, temperature: float | None) -> None:
    g = gen(11)
    mask = torch.rand(24, 10, generator=g) < torch.linspace(0.05, 0.9, 24).unsqueeze(1)
    mask[8:12] = False  # an empty group
    weight_abs = torch.randn(24, 10, generator=g).abs() * mask
    kept = soft_removal(weight_abs, mask, group_rows=4, zeta_t=zeta_t, temperature=temperature, generator=g)
    assert not torch.any(kept & ~mask)
    for group in range(6):
        n = int(mask[4 * group: 4 * group + 4].sum())
        expected = 0 if n == 0 else max(1, n - math.floor(zeta_t * n))
        assert int(kept[4 * group: 4 * group + 4].sum()) == expected
    assert removal_keep_counts(torch.tensor([0, 1, 10, 100]), 0.1).tolist() == [0, 1, 9, 90]


def test_soft_removal_samples_without_replacement_proportional_to_power() -> None:
    """Kept links ~ sequential sampling without replacement with p ∝ |w|^T (T = 2)."""
    rows = 6000
    weight_abs = torch.tensor([1.0, 2.0, 3.0]).repeat(rows, 1)
    mask = torch.ones(rows, 3, dtype=torch.bool)
    p = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64) / 14.0
    # keep 1 of 3 (floor(0.7·3) = 2 removed): P(keep i) = p_i
    kept = soft_removal(weight_abs, mask, group_rows=1, zeta_t=0.7, temperature=2.0, generator=gen(0))
    assert stats.chisquare(kept.sum(0).double().numpy(), (rows * p).numpy()).pvalue > 1e-3
    # keep 2 of 3: P(drop i) = Σ_{j≠i} p_j · p_k / (1 − p_j), {j, k} the other two
    kept = soft_removal(weight_abs, mask, group_rows=1, zeta_t=0.4, temperature=2.0, generator=gen(1))
    assert torch.all(kept.sum(1) == 2)
    drop = []
    for i in range(3):
        j, k = (x for x in range(3) if x != i)
        drop.append(float(p[j] * p[k] / (1 - p[j]) + p[k] * p[j] / (1 - p[k])))
    observed = (~kept).sum(0).double().numpy()
    assert stats.chisquare(observed, [rows * d for d in drop]).pvalue > 1e-3


def test_removal_takes_zero_weights_first_and_set_removal_is_magnitude_top_k() -> None:
    weight_abs = torch.tensor([[0.0, 1e-30, 2.0, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    for seed in range(20):  # keep 3 of 5: the three non-zero weights, whatever the sampling
        kept = soft_removal(weight_abs, mask, group_rows=1, zeta_t=0.4, temperature=9.0, generator=gen(seed))
        assert kept.tolist() == [[False, True, True, True, False, False]]
    g = gen(4)
    weight_abs = torch.rand(12, 16, generator=g)
    mask = torch.rand(12, 16, generator=g) < 0.5
    kept = soft_removal(weight_abs * mask, mask, group_rows=3, zeta_t=0.3, temperature=None, generator=g)
    for group in range(4):
        rows = slice(3 * group, 3 * group + 3)
        survivors = weight_abs[rows][kept[rows]]
        removed = weight_abs[rows][mask[rows] & ~kept[rows]]
        assert removed.numel() > 0 and survivors.min() > removed.max()


# ----------------------------------------------------------------------------- regrowth


def test_regrow_topk_takes_the_highest_scores_among_inactive_positions() -> None:
    g = gen(9)
    mask = torch.rand(16, 20, generator=g) < 0.3
    scores = ch2_l3n_scores(mask)
    n_regrow = torch.tensor([5, 0, 11, 3])
    grown = regrow_links(scores, mask, n_regrow, group_rows=4, generator=g)
    assert not torch.any(grown & mask)
    for group in range(4):
        rows = slice(4 * group, 4 * group + 4)
        assert int(grown[rows].sum()) == int(n_regrow[group])
        if n_regrow[group]:
            passed_over = scores[rows][~mask[rows] & ~grown[rows]]
            assert scores[rows][grown[rows]].min() >= passed_over.max()


def test_regrow_breaks_ties_uniformly_at_random() -> None:
    rows = 4500
    kept = torch.zeros(rows, 10, dtype=torch.bool)
    kept[:, 0] = True
    grown = regrow_links(torch.zeros(rows, 10), kept, torch.ones(rows, dtype=torch.long), group_rows=1,
                         generator=gen(0))
    counts = grown.sum(0)
    assert counts[0] == 0 and torch.all(grown.sum(1) == 1)
    assert stats.chisquare(counts[1:].double().numpy()).pvalue > 1e-3
    # a tie at the top between two positions: each wins half of the time, nothing else is taken
    scores = torch.tensor([0.0, 5.0, 5.0, 1.0, 0.0]).repeat(rows, 1)
    one = torch.ones(rows, dtype=torch.long)
    grown = regrow_links(scores, kept[:, :5], one, group_rows=1, generator=gen(1))
    counts = grown.sum(0)
    assert counts[0] == counts[3] == counts[4] == 0
    assert abs(int(counts[1]) - rows / 2) < 4 * math.sqrt(rows / 4)


def test_regrow_sample_is_proportional_to_score() -> None:
    rows = 6000
    kept = torch.tensor([True, False, False, False, False]).repeat(rows, 1)
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.0]).repeat(rows, 1)
    one = torch.ones(rows, dtype=torch.long)
    grown = regrow_links(scores, kept, one, group_rows=1, generator=gen(2), sample=True)
    counts = grown.sum(0)
    assert counts[0] == counts[4] == 0
    assert stats.chisquare(counts[1:4].double().numpy(), [rows / 6, rows / 3, rows / 2]).pvalue > 1e-3
    # more links than positive scores: the zero-score position fills the rest
    grown = regrow_links(scores, kept, 4 * one, group_rows=1, generator=gen(3), sample=True)
    assert torch.all(grown == ~kept)


# ----------------------------------------------------------------------------- the engine

SHAPES = {  # name: (in, out, group_rows)
    "blk.q_proj": (24, 32, 8),
    "blk.up_proj": (24, 40, None),
    "blk.down_proj": (40, 24, None),
}


def make_layers(seed: int = 0, sparsity: float = 0.8) -> dict[str, SparseLowRankLinear]:
    torch.manual_seed(seed)
    layers = {}
    for name, (in_f, out_f, rows) in SHAPES.items():
        layer = SparseLowRankLinear(in_f, out_f, method="chts", sparsity=sparsity, group_rows=rows)
        torch.nn.init.normal_(layer.weight, std=0.02)
        layers[name] = layer
    return layers


def make_engine(layers: dict[str, SparseLowRankLinear], **kw) -> TopologyEngine:
    options = dict(total_steps=200, update_interval=10, zeta=0.3, seed=0)
    options.update(kw)
    return TopologyEngine(layers, **options)


def group_counts(engine: TopologyEngine, name: str, mask: torch.Tensor | None = None) -> list[int]:
    layer = engine.layers[name]
    m = layer.mask if mask is None else mask
    return m.reshape(layer.out_features // engine.group_rows(layer), -1).sum(1).tolist()


def drift_weights(layers: dict[str, SparseLowRankLinear], step: int) -> None:
    """A deterministic stand-in for training: new random values on every active link."""
    g = gen(1000 + step)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * layer.mask)


def test_schedules_and_update_steps() -> None:
    engine = make_engine(make_layers(), total_steps=1000, update_interval=100, zeta=0.1)
    assert [s for s in range(0, 1001) if engine.is_update_step(s)] == list(range(100, 701, 100))
    assert engine.zeta_at(0) == pytest.approx(0.1) and engine.zeta_at(750) == pytest.approx(0.0)
    assert engine.zeta_at(375) == pytest.approx(0.05)
    assert engine.temperature_at(0) == 1.0 and engine.temperature_at(750) == pytest.approx(9.0)
    assert engine.temperature_at(375) == pytest.approx(5.0)
    static = make_engine(make_layers(), mode="static", total_steps=1000, update_interval=100)
    assert not any(static.is_update_step(s) for s in range(1001))
    with pytest.raises(RuntimeError):
        static.update(100)
    with pytest.raises(ValueError):
        engine.update(800)  # beyond T_end


@pytest.mark.parametrize("mode", ["chts", "set"])
@pytest.mark.parametrize("per_head", [True, False])
def test_update_returns_each_group_to_its_target(mode: str, per_head: bool) -> None:
    layers = make_layers()
    engine = make_engine(layers, mode=mode, per_head=per_head)
    engine.init_masks()
    for step in (10, 20, 30):
        drift_weights(layers, step)
        before = {name: group_counts(engine, name) for name in layers}
        result = engine.update(step)
        zeta_t = engine.zeta_at(step)
        for name, layer in layers.items():
            target = link_count(engine.group_rows(layer) * layer.in_features, layer.sparsity)
            kept = [max(1, n - math.floor(zeta_t * n)) for n in before[name]]
            assert group_counts(engine, name) == [max(target, k) for k in kept]
            removed = sum(n - k for n, k in zip(before[name], kept, strict=True))
            assert result["layers"][name]["removed"] == removed
            assert result["layers"][name]["active"] == int(layer.mask.sum())
            assert 0.0 <= result["layers"][name]["frac_changed"] <= 1.0
        assert result["time_s"] > 0 and result["removed"] > 0
    q = layers["blk.q_proj"]
    expected_groups = 4 if per_head else 1
    assert len(group_counts(engine, "blk.q_proj")) == expected_groups
    assert engine.target_links(q) == link_count((8 if per_head else 32) * 24, 0.8)


@pytest.mark.parametrize("randomness", [0.0, 0.25, 1.0])
def test_init_masks_start_every_group_at_its_target(randomness: float) -> None:
    # BRF counts links per layer; the budget (`chtsl info`) per topology group (per head for q/k/v).
    for seed in range(3):
        engine = make_engine(make_layers(seed, sparsity=0.87), brf_randomness=randomness, seed=seed)
        engine.init_masks()
        for name, layer in engine.layers.items():
            assert set(group_counts(engine, name)) == {engine.target_links(layer)}, name
            assert layer.weight[~layer.mask].abs().max() == 0


def test_removal_never_takes_more_than_scheduled_from_a_group_above_target() -> None:
    layers = make_layers()
    engine = make_engine(layers, zeta=0.05)
    engine.init_masks()
    layer = layers["blk.up_proj"]
    with torch.no_grad():
        layer.mask[:, :12] = True  # far above target (0.2 · 40 · 24 = 192 links)
    drift_weights(layers, 0)
    n = int(layer.mask.sum())
    engine.update(10)
    assert int(layer.mask.sum()) == n - math.floor(engine.zeta_at(10) * n)


@pytest.mark.parametrize("mode", ["chts", "set"])
def test_links_removed_and_regrown_in_one_update_restart_from_zero(mode: str) -> None:
    layers = make_layers()
    engine = make_engine(layers, mode=mode, zeta=1.0)  # ζ_t ≈ 1 at step 1: one link per group survives
    engine.init_masks()
    drift_weights(layers, 1)
    opt = torch.optim.Adam([layer.weight for layer in layers.values()])
    for layer in layers.values():
        opt.state[layer.weight] = {"step": torch.tensor(1.0), "exp_avg": layer.weight.detach().clone(),
                                   "exp_avg_sq": layer.weight.detach().square()}
    old = {name: layer.mask.clone() for name, layer in layers.items()}
    engine.update(1, opt)
    for name, layer in layers.items():
        n_groups = layer.out_features // engine.group_rows(layer)
        nonzero = layer.weight.detach() != 0
        assert int(nonzero.sum()) == n_groups  # only the survivors keep their value...
        assert torch.equal(opt.state[layer.weight]["exp_avg"] != 0, nonzero)  # ...and their moments
        assert (layer.mask & old[name] & ~nonzero).any()  # some links were removed and regrown in place


def test_set_mode_removes_the_smallest_magnitudes() -> None:
    layers = make_layers()
    engine = make_engine(layers, mode="set")
    engine.init_masks()
    drift_weights(layers, 7)
    old = {n: (layer.mask.clone(), layer.weight.detach().abs().clone()) for n, layer in layers.items()}
    engine.update(10)
    for name, layer in layers.items():
        mask, w = old[name]
        survived = mask & (layer.weight.detach() != 0)  # removed (and regrown) links restart at 0
        rows = engine.group_rows(layer)
        for g0 in range(0, layer.out_features, rows):
            r = slice(g0, g0 + rows)
            assert w[r][survived[r]].min() >= w[r][mask[r] & ~survived[r]].max()


def test_static_mode_draws_a_uniform_support_and_keeps_it() -> None:
    layers = make_layers()
    engine = make_engine(layers, mode="static")
    engine.init_masks()
    up = layers["blk.up_proj"].mask.clone()
    assert not torch.equal(up, brf_mask(40, 24, 0.8, 0.0, gen(0)))
    assert int(up.sum()) == round(0.2 * 40 * 24)
    run_training(layers, engine, torch.optim.Adam, steps=12)
    assert torch.equal(layers["blk.up_proj"].mask, up)


def run_training(
    layers: dict[str, SparseLowRankLinear],
    engine: TopologyEngine,
    optimizer_cls: type[torch.optim.Optimizer],
    steps: int,
    check: bool = False,
) -> list[dict]:
    """What the trainer does: forward/backward every iteration; on update iterations the topology
    update replaces the optimizer step; otherwise step then re-mask weights and Adam moments."""
    torch.manual_seed(123)
    q, up, down = layers["blk.q_proj"], layers["blk.up_proj"], layers["blk.down_proj"]
    params = [p for layer in layers.values() for p in layer.parameters()]
    opt = optimizer_cls(params, lr=1e-2)
    results = []
    for step in range(1, steps + 1):
        x = torch.randn(6, 24)
        loss = (down(torch.tanh(up(x))) - x).square().mean() + q(x).square().mean()
        opt.zero_grad()
        loss.backward()
        if check:
            for layer in layers.values():
                assert torch.all(layer.weight.grad[~layer.mask] == 0)
        if engine.is_update_step(step):
            before = {n: (layer.mask.clone(), opt.state[layer.weight]["exp_avg"].clone())
                      for n, layer in layers.items()}
            results.append(engine.update(step, opt))
            if check:
                for name, layer in layers.items():
                    mask, exp_avg = before[name]
                    new = layer.mask & ~mask  # links regrown where there was none
                    assert new.any() and torch.all(layer.weight[new] == 0)
                    state = opt.state[layer.weight]
                    assert torch.all(state["exp_avg"][new] == 0) and torch.all(state["exp_avg_sq"][new] == 0)
                    survived = layer.mask & mask & (state["exp_avg"] != 0)
                    # moments of the surviving links are kept, not reset
                    assert survived.any() and torch.equal(state["exp_avg"][survived], exp_avg[survived])
            continue
        opt.step()
        engine.apply_masks(opt)
        if check:
            for layer in layers.values():
                off = ~layer.mask
                state = opt.state[layer.weight]
                assert torch.all(layer.weight[off] == 0)
                assert torch.all(state["exp_avg"][off] == 0) and torch.all(state["exp_avg_sq"][off] == 0)
    return results


@pytest.mark.parametrize("optimizer_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_masked_positions_have_zero_weight_grad_and_moments(
    optimizer_cls: type[torch.optim.Optimizer],
) -> None:
    layers = make_layers()
    engine = make_engine(layers)
    engine.init_masks()
    results = run_training(layers, engine, optimizer_cls, steps=25, check=True)
    assert [r["step"] for r in results] == [10, 20]


def test_same_seed_same_decisions_and_other_seed_differs() -> None:
    def masks_after(seed: int, regrow: str = "topk") -> list[torch.Tensor]:
        layers = make_layers()
        engine = make_engine(layers, seed=seed, brf_randomness=0.25, regrow=regrow)
        engine.init_masks()
        run_training(layers, engine, torch.optim.Adam, steps=30)
        return [layer.mask.clone() for layer in layers.values()]

    for regrow in ("topk", "sample"):
        a, b, c = masks_after(0, regrow), masks_after(0, regrow), masks_after(1, regrow)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_save_load_continue_matches_an_uninterrupted_engine(tmp_path: Path) -> None:
    steps = (10, 20, 30, 40)

    def run(engine: TopologyEngine, layers: dict[str, SparseLowRankLinear], todo: tuple[int, ...]) -> None:
        for step in todo:
            drift_weights(layers, step)
            engine.update(step)

    layers_a = make_layers()
    engine_a = make_engine(layers_a, brf_randomness=0.25)
    engine_a.init_masks()
    run(engine_a, layers_a, steps)

    layers_b = make_layers()
    engine_b = make_engine(layers_b, brf_randomness=0.25)
    engine_b.init_masks()
    run(engine_b, layers_b, steps[:2])
    state = engine_b.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, tmp_path / "topology.safetensors")
    (tmp_path / "topology.json").write_text(json.dumps({k: v for k, v in state.items() if k not in tensors}))

    layers_c = make_layers(seed=99)  # fresh model; weights are restored from "the checkpoint"
    with torch.no_grad():
        for name, layer in layers_c.items():
            layer.weight.copy_(layers_b[name].weight)
    engine_c = make_engine(layers_c, brf_randomness=0.25, seed=5)  # the loaded RNG state wins
    engine_c.load_state_dict({**load_file(tmp_path / "topology.safetensors"),
                              **json.loads((tmp_path / "topology.json").read_text())})
    assert engine_c.n_updates == 2 and engine_c.last_update_step == 20
    run(engine_c, layers_c, steps[2:])
    for name in layers_a:
        assert torch.equal(layers_a[name].mask, layers_c[name].mask)
    # and the continuation really changed the topology after the checkpoint
    assert any(not torch.equal(layers_a[n].mask, load_file(tmp_path / "topology.safetensors")[f"mask.{n}"])
               for n in layers_a)


# ----------------------------------------------------------------------------- torch.distributed


def rank_weights(layers: dict[str, SparseLowRankLinear], step: int, rank: int) -> None:
    """Rank r holds base + (r − ½)·noise on the active links; the rank average is the base."""
    g = gen(500 + step)
    with torch.no_grad():
        for layer in layers.values():
            # multiples of 1/256: base ± noise/2 and their mean are exact, so the average is bitwise base
            base = torch.round(torch.randn(layer.weight.shape, generator=g) * 256) / 256
            noise = torch.round(torch.randn(layer.weight.shape, generator=g) * 256) / 256
            layer.weight.copy_((base + (rank - 0.5) * noise) * layer.mask)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        layers = make_layers()
        engine = make_engine(layers, brf_randomness=0.25)
        engine.init_masks()
        stats_removed = []
        for step in (10, 20, 30):
            rank_weights(layers, step, rank)
            stats_removed.append(engine.update(step)["removed"])
        masks = {name: layer.mask.to(torch.uint8).contiguous() for name, layer in layers.items()}
        masks["rng_state"] = engine.generator.get_state()
        masks["removed"] = torch.tensor(stats_removed)
        save_file(masks, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two gloo processes
def test_two_process_gloo_ranks_end_with_identical_masks(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # The decisions are those of one process holding the rank-averaged weights.
    layers = make_layers()
    engine = make_engine(layers, brf_randomness=0.25)
    engine.init_masks()
    for step in (10, 20, 30):
        g = gen(500 + step)
        with torch.no_grad():
            for layer in layers.values():
                base = torch.round(torch.randn(layer.weight.shape, generator=g) * 256) / 256
                torch.randn(layer.weight.shape, generator=g)  # the noise, which averages out
                layer.weight.copy_(base * layer.mask)
        engine.update(step)
    for name, layer in layers.items():
        assert torch.equal(layer.mask.to(torch.uint8), rank0[name]), name


@pytest.mark.parametrize("method", ["chtsl", "chts"])
def test_training_starts_with_s_drawn_on_the_brf_support(method: str) -> None:
    """docs/method.md §1: S keeps N(0, initializer_range²) values on its (BRF) mask. Replacing the
    construction mask by the BRF one used to keep only the shared links, so ≈ 95 % of S started at 0."""
    from tests.conftest import tiny_model
    from train.trainer import build_engine

    models = {}
    for storage in ("masked", "csr"):
        model = tiny_model(method, storage=storage)
        build_engine(model, total_steps=100, update_interval=10, seed=3)
        models[storage] = model
        layers = model.sparse_layers().values()
        values = torch.cat([layer.sparse_weight().detach()[layer.support_mask()] for layer in layers])
        assert bool((values != 0).all()), f"{storage}: {(values == 0).float().mean():.1%} of S is zero"
        std = model.config.initializer_range
        assert abs(float(values.std()) - std) < 0.1 * std
    for name, layer in models["masked"].sparse_layers().items():  # both storages draw the same values
        assert torch.equal(layer.sparse_weight(), models["csr"].sparse_layers()[name].sparse_weight())
