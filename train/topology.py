"""The CHTs topology engine (docs/method.md §3): BRF mask init, soft magnitude removal, CH2-L3n regrowth.

A sparse layer holds its sparse matrix `S` (out × in) in a storage (`chtsl_infer.model.storage`):
a dense `weight` times a boolean `mask` buffer (masked) or CSR `values` (nnz,) over
`crow_indices`/`col_indices` (csr). `TopologyEngine` owns the supports of all sparse layers of a model
and asks each layer's storage for |S|, the support and the remap of S and its optimizer state:

- `init_masks()` draws every mask with the bipartite receptive field (BRF) rule;
- `apply_masks(optimizer)`, called after every optimizer step, re-zeroes the weights and the Adam
  moments outside the masks (`SparseStorage.after_step`);
- `update(step, optimizer)`, called on the iterations where `is_update_step(step)` holds (the
  trainer skips the optimizer step of those iterations, as the reference code does), removes a
  scheduled fraction of each group's links by soft magnitude sampling and regrows the same number
  at the positions with the highest CH2-L3n scores (or uniformly at random for `set`).

Module-level functions (`brf_mask`, `ch2_l3n_scores`, `soft_removal`, `regrow_links`) are the pure
building blocks; each takes an explicit `torch.Generator` for its randomness. The engine derives one
generator per layer and update from its own seeded CPU generator, so its decisions depend only on its
seed, the weights and the masks, and `state_dict()` (masks, schedule position, RNG state) is enough
to resume with identical decisions.

Csr storage: the engine makes the same decisions from the same random draws (so equal seeds give
equal masks in both storages). Per layer, one at a time, it builds transient dense tensors: the
bool support (out × in) and |values| scattered into a float32 (out × in) for removal (which then
works on the active links only), the CH2-L3n scores (on CPU with the compiled kernels two float64
(out × in) halves; elsewhere float64 (out × in) plus the (out × out) and (in × in) CH matrices),
the regrowth's float32 keys (out × in) and the new mask; then `CsrStorage.remap` rebuilds the CSR
support and moves values, gradient and Adam moments of kept links to their new positions in place
(regrown links start at 0 with zero moments), so nnz, parameter identity and optimizer state size
never change.
The transient peak of one update is therefore that of the largest layer, about
`(out·in)·(1 + 4 + 16 + 4 + 1)` bytes on CPU plus the index arrays (∝ nnz), e.g. ~40 MB for
llama130m's down_proj (768 × 2048) and ~0.3 GB for llama1b's (2048 × 5461); it is freed before the
next layer.

Steps: `step` is the 1-based index of the training iteration (the trainer's global step counter
after it is incremented, i.e. 1 for the first batch), counting the update iterations whose optimizer
step is skipped. With `update_interval = 100` updates happen at iterations 100, 200, ... while
`step <= T_end = t_end_fraction · total_steps`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist

from chtsl_infer import kernels
from chtsl_infer.model.budget import brf_links
from chtsl_infer.model.csr import mask_to_csr
from chtsl_infer.model.layers import SparseLowRankLinear, link_count
from chtsl_infer.model.modeling import init_sparse_values

Mode = Literal["chts", "set", "static"]
RegrowRule = Literal["topk", "sample"]
MODES: tuple[str, ...] = ("chts", "set", "static")
REGROW_RULES: tuple[str, ...] = ("topk", "sample")

# Sort key given to candidates of zero weight (removal) or zero score (sampled regrowth) before the
# Gumbel noise is added: far below any real key (T·log|w| >= T·log(1.4e-45) ≈ -103·T), so those
# candidates are only taken once all others are, and in uniformly random order among themselves.
_ZERO_KEY = -1.0e5
# Per-layer statistics exchanged between ranks, in this order (see `TopologyEngine.update`).
_STAT_FIELDS = ("active_before", "removed", "regrown", "active_after", "lost", "removed_abs_sum")


# ----------------------------------------------------------------------------- random helpers


def _gumbel(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard Gumbel noise (float32, on the generator's device), finite: in about [-2.8, 17]."""
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    # rand is in [0, 1): clamp away 0 so -log(-log u) stays finite; u < 1 keeps -log u > 0.
    return u.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()


def _tie_broken_key(values: torch.Tensor, valid: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """int64 sort key ordering by `values` (float, >= 0), exact ties broken uniformly at random.

    The bit pattern of a non-negative float32 is monotone in its value, so `(bits << 31) | noise`
    with 31 random bits orders lexicographically by (value, noise). Invalid positions get -1, below
    every valid key. `values`, `valid`: same shape, on the generator's device.
    """
    # + 0.0 turns -0.0 (sign bit set, a negative int32) into +0.0.
    bits = (values.to(torch.float32).clamp(min=0.0) + 0.0).view(torch.int32).to(torch.int64)
    noise = torch.randint(0, 2**31, values.shape, generator=generator, device=generator.device)
    return torch.where(valid, (bits << 31) | noise, torch.full_like(bits, -1))


def _top_per_row(keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool (R, N): True at the `counts[r]` largest `keys[r]` of each row r.

    keys: (R, N), any sortable dtype; counts: (R,) int64 with 0 <= counts <= N. The caller
    guarantees that each row has at least `counts[r]` keys above its excluded positions.
    """
    out = torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
    kmax = int(counts.max()) if counts.numel() else 0
    if kmax == 0:
        return out
    idx = keys.topk(kmax, dim=1, largest=True, sorted=True).indices
    take = torch.arange(kmax, device=keys.device).unsqueeze(0) < counts.unsqueeze(1)
    # topk indices are distinct within a row, so the scatter writes each position at most once.
    return out.scatter_(1, idx, take)


def _top_per_run(keys: torch.Tensor, runs: torch.Tensor, counts: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool (n,): True at the `k[r]` largest `keys` of each run r of consecutive entries.

    keys: (n,); runs: (n,) int64 run index of each entry, non-decreasing; counts: (R,) run lengths
    (zeros allowed); k: (R,) int64 with k <= counts. The runs are padded into one (R, max count)
    matrix, so `_top_per_row` selects in all of them at once.
    """
    slot = torch.arange(keys.numel(), device=keys.device) - (torch.cumsum(counts, 0) - counts)[runs]
    lowest = torch.finfo(keys.dtype).min if keys.is_floating_point() else torch.iinfo(keys.dtype).min
    padded = torch.full((counts.numel(), int(counts.max())), lowest, dtype=keys.dtype, device=keys.device)
    padded[runs, slot] = keys
    return _top_per_row(padded, k)[runs, slot]


# ----------------------------------------------------------------------------- BRF initialisation


def brf_degrees(
    n_small: int, n_big: int, n_links: int, randomness: float, generator: torch.Generator
) -> torch.Tensor:
    """Degrees (n_small,) int64 of the small-side nodes, summing to `n_links`, each in [1, n_big].

    "Uniform" degree distribution (docs/method.md §3): every node gets 1 and the remaining
    `n_links - n_small` go to uniformly random nodes. A node already at `n_big` cannot take more;
    its overflow is re-drawn among the nodes with room (it only matters for densities near 1).

    Choice: for `randomness == 0` the whole BRF is deterministic (issue 3: "r = 0 deterministic
    nearest", seed-independent), so the remaining links are spread evenly instead: every node gets
    floor(n_links / n_small) or one more, the extra ones equally spaced along the node index.
    """
    if not n_small <= n_links <= n_small * n_big:
        raise ValueError(f"BRF needs {n_small} <= links <= {n_small * n_big}, got {n_links}")
    device = generator.device
    idx = torch.arange(n_small, device=device)
    if randomness == 0.0:
        base, extra = divmod(n_links, n_small)
        return base + ((idx + 1) * extra // n_small - idx * extra // n_small)
    degrees = torch.ones(n_small, dtype=torch.int64, device=device)
    remaining = n_links - n_small
    while remaining > 0:
        free = (degrees < n_big).nonzero().squeeze(1)
        picks = free[torch.randint(0, free.numel(), (remaining,), generator=generator, device=device)]
        degrees += torch.bincount(picks, minlength=n_small)
        overflow = (degrees - n_big).clamp(min=0)
        degrees -= overflow
        remaining = int(overflow.sum())
    return degrees


def brf_mask(
    out_features: int,
    in_features: int,
    sparsity: float,
    randomness: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bipartite receptive field mask, bool (out_features × in_features), on the generator's device.

    docs/method.md §3: `K = round((1-s)·n_big·n_small)` links; small-side node i (rows if out <= in,
    else columns) has degree k_i (`brf_degrees`) and centre `c_i = (i·stride) mod n_big`,
    `stride = max(1, n_big // n_small)`; with ring distance `d(j) = min(|j-c_i|, n_big-|j-c_i|)`
    it connects to its k_i nearest positions for `randomness` r = 0 (equal distances: the position
    after the centre first), else to k_i positions sampled without replacement with
    `p(j) ∝ (1+d(j))^(-(1-r)/r)` (Gumbel top-k; r = 1 is uniform).
    """
    if not 0.0 <= randomness <= 1.0:
        raise ValueError(f"BRF randomness must be in [0, 1], got {randomness}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    device = generator.device
    n_small, n_big = min(out_features, in_features), max(out_features, in_features)
    n_links = brf_links(out_features, in_features, sparsity)
    degrees = brf_degrees(n_small, n_big, n_links, randomness, generator)

    stride = max(1, n_big // n_small)
    centres = torch.arange(n_small, device=device) * stride % n_big
    # offset[i, j] = (j - c_i) mod n_big; the ring distance only depends on the offset.
    offset = (torch.arange(n_big, device=device).unsqueeze(0) - centres.unsqueeze(1)) % n_big
    if randomness == 0.0:
        o = torch.arange(n_big, device=device)
        backward = o > n_big - o  # offsets closer going backwards around the ring
        dist_o = torch.minimum(o, n_big - o)
        # Unique key per offset: distance first, then forward (+d) before backward (-d).
        order = torch.argsort(2 * dist_o + backward.long())
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n_big, device=device)
        small_by_big = rank[offset] < degrees.unsqueeze(1)
    else:
        ring = torch.minimum(offset, n_big - offset).to(torch.float32)
        alpha = (1.0 - randomness) / randomness
        keys = _gumbel(tuple(ring.shape), generator)
        if alpha > 0.0:
            keys -= alpha * torch.log1p(ring)
        small_by_big = _top_per_row(keys, degrees)
    return small_by_big if out_features <= in_features else small_by_big.T.contiguous()


# ----------------------------------------------------------------------------- CH2-L3n regrowth scores


def _ch_weights(common: torch.Tensor, degree: torch.Tensor) -> torch.Tensor:
    """`(C + 1[C≠0]) / (e + 1)`, `e[u,v] = max((deg[v] − C[u,v])·1[C≠0], 1) − 1`, float64 (n × n).

    common: (n, n) float counts of shared neighbours C; degree: (n,) float64 node degrees.
    """
    c = common.to(torch.float64)
    nonzero = c != 0
    # e + 1 = max((deg[v] − C[u,v])·1[C≠0], 1): the degree of the second node v (column index).
    denominator = (degree.unsqueeze(0) - c).mul_(nonzero).clamp_(min=1.0)
    return c.add_(nonzero).div_(denominator)


@torch.no_grad()
def ch2_l3n_scores(mask: torch.Tensor) -> torch.Tensor:
    """CH2-L3n link-prediction scores of a bipartite mask, float32 (out × in), 0 on active positions.

    docs/method.md §3: `D = M Mᵀ`, `E = Mᵀ M`, `P = (D + 1[D≠0]) / (e_o + 1)`,
    `Q = (E + 1[E≠0]) / (e_i + 1)`, score `= P M + (Q Mᵀ)ᵀ`.

    CPU with the compiled kernels: from M's CSR structure (`kernels.ch2_l3n_half`, `csrc/ch_scores.c`),
    work ∝ nnz·(rows sharing a neighbour), no (out × out) or (in × in) matrix; measured 1.4–2× faster
    than the dense products at 5 % density on llama130m's shapes (one loaded EPYC core; the whole
    update, with removal on the active links only, 4.3×). Elsewhere (CUDA, no compiler):
    `ch2_l3n_scores_dense`. Both sum in float64 and round to float32 only at the end, so scores
    that are equal in exact arithmetic (frequent: the BRF band is symmetric) come out bitwise equal
    and their ties are then broken at random, not by summation-order noise.
    """
    if mask.dim() != 2:
        raise ValueError(f"expected a 2-D mask, got shape {tuple(mask.shape)}")
    active = mask.to(torch.bool)
    if active.device.type != "cpu" or not kernels.cpu_kernel_status()[0]:
        return ch2_l3n_scores_dense(active)
    rows, cols = mask_to_csr(active), mask_to_csr(active.T)
    half = kernels.ch2_l3n_half(*rows, *cols, active.shape)
    return half.add_(kernels.ch2_l3n_half(*cols, *rows, active.T.shape).T).masked_fill_(active, 0.0).to(
        torch.float32)


@torch.no_grad()
def ch2_l3n_scores_dense(mask: torch.Tensor) -> torch.Tensor:
    """`ch2_l3n_scores` with dense matrix products on the mask's device (~4·out·in·(out+in) flop).

    Precision: D and E are counts of 0/1 products, exact in float32 (counts < 2^24; also exact with
    TF32 or bf16 inputs, whose 0/1 entries are exact, since the accumulation is float32). The
    products with the fractional P and Q run in float64 and are rounded to float32 only at the end.
    """
    active = mask.to(torch.bool)
    m32 = active.to(torch.float32)
    m64 = active.to(torch.float64)
    p = _ch_weights(m32 @ m32.T, m64.sum(1))  # (out, out): output nodes sharing inputs
    scores = p @ m64
    del p  # free the (out × out) block before the (in × in) one
    q = _ch_weights(m32.T @ m32, m64.sum(0))  # (in, in): input nodes sharing outputs
    scores.addmm_(m64, q.T)  # (Q Mᵀ)ᵀ = M Qᵀ
    del q
    return scores.masked_fill_(active, 0.0).to(torch.float32)


# ----------------------------------------------------------------------------- removal and regrowth


def removal_keep_counts(n_active: torch.Tensor, zeta_t: float) -> torch.Tensor:
    """Links kept per group: `max(1, n_active − floor(ζ_t·n_active))` (0 for an empty group)."""
    n_remove = torch.floor(n_active.to(torch.float64) * zeta_t).to(torch.int64)
    keep = (n_active - n_remove).clamp(min=1)
    return torch.minimum(keep, n_active)


def soft_removal(
    weight_abs: torch.Tensor,
    mask: torch.Tensor,
    *,
    group_rows: int,
    zeta_t: float,
    temperature: float | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """The links kept by removal, bool (out × in), a subset of `mask` with `removal_keep_counts` per group.

    weight_abs: (out, in) |w| (float); mask: (out, in) bool; groups are blocks of `group_rows`
    consecutive rows. With a `temperature` T, the kept links of a group are a sample without
    replacement with p ∝ |w|^T over its active links, drawn as Gumbel top-k of `T·log|w| + G`
    (no underflow of |w|^T); active links with w = 0 are kept only after all others, at random.
    With `temperature=None` (SET) the largest |w| are kept, exact ties broken at random.
    """
    out_features, in_features = mask.shape
    n_groups = out_features // group_rows
    active = mask.to(torch.bool).contiguous()
    if temperature is not None and not 0.0 < temperature < 500.0:  # beyond ~500, T·log|w| of tiny weights
        raise ValueError(f"removal temperature must be in (0, 500), got {temperature}")  # nears _ZERO_KEY
    # Only the active links take part (∝ nnz, not out × in): flat indices in row-major order, so
    # each group's links are one contiguous run; the removed ones are the smallest keys of a group.
    links = active.reshape(-1).nonzero().squeeze(1)
    counts = active.reshape(n_groups, -1).sum(1)
    n_remove = counts - removal_keep_counts(counts, zeta_t)
    kept = active.clone()
    if links.numel() == 0 or int(n_remove.max()) == 0:
        return kept
    w = weight_abs.reshape(-1)[links].to(torch.float32)
    if temperature is None:
        keys = _tie_broken_key(w, torch.ones_like(w, dtype=torch.bool), generator)
    else:
        g = _gumbel(tuple(w.shape), generator)
        keys = torch.where(w > 0, temperature * torch.log(w) + g, _ZERO_KEY + g)
    group = torch.repeat_interleave(torch.arange(n_groups, device=links.device), counts)
    removed = _top_per_run(-keys, group, counts, n_remove)  # the n_remove smallest keys of each group
    kept.view(-1)[links[removed]] = False
    return kept


def regrow_links(
    scores: torch.Tensor | None,
    kept: torch.Tensor,
    n_regrow: torch.Tensor,
    *,
    group_rows: int,
    generator: torch.Generator,
    sample: bool = False,
) -> torch.Tensor:
    """The regrown links, bool (out × in), disjoint from `kept`, `n_regrow[g]` of them in group g.

    scores: (out, in) float >= 0 (CH2-L3n) or None for uniformly random regrowth (SET);
    kept: (out, in) bool mask after removal; n_regrow: (n_groups,) int64, at most the inactive
    positions of each group. Top-k (default): the highest scores among the inactive positions,
    exact ties (e.g. all-zero scores) broken uniformly at random. `sample=True`: a sample without
    replacement with p ∝ score (Gumbel top-k of log score); zero-score positions only fill what the
    positive ones cannot, uniformly at random.
    """
    out_features, in_features = kept.shape
    n_groups = out_features // group_rows
    inactive = ~kept.to(torch.bool).reshape(n_groups, group_rows * in_features)
    if scores is None:
        values = torch.zeros(inactive.shape, dtype=torch.float32, device=kept.device)
    else:
        values = scores.reshape(n_groups, group_rows * in_features).to(torch.float32)
    if sample and scores is not None:
        g = _gumbel(tuple(values.shape), generator)
        keys = torch.where(values > 0, torch.log(values) + g, _ZERO_KEY + g)
        keys.masked_fill_(~inactive, -math.inf)
        return _top_per_row(keys, n_regrow.to(torch.int64)).reshape(out_features, in_features)
    return _top_with_random_ties(values, inactive, n_regrow.to(torch.int64), generator).reshape(
        out_features, in_features)


def _top_with_random_ties(values: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor,
                          generator: torch.Generator) -> torch.Tensor:
    """Bool (R, N): the `counts[r]` largest `values[r]` among `valid[r]`, exact ties at the cutoff
    broken uniformly at random.

    values: (R, N) float >= 0; valid: (R, N) bool with at least counts[r] valid positions per row.
    The same distribution as `_top_per_row` of `_tie_broken_key`, but random numbers are drawn only
    for the positions tied at each row's cutoff value, not for all R·N.
    """
    v = values.masked_fill(~valid, -1.0)
    out = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    kmax = int(counts.max()) if counts.numel() else 0
    if kmax == 0:
        return out
    top = v.topk(kmax, dim=1, largest=True, sorted=True).values
    cutoff = top.gather(1, (counts - 1).clamp(min=0).unsqueeze(1))  # (R, 1): the counts[r]-th largest
    cutoff[counts == 0] = math.inf  # nothing taken from such rows
    out = v > cutoff
    need = counts - out.sum(1)  # how many of the tied positions each row still takes (>= 0)
    tied = (v == cutoff).nonzero()  # (m, 2), row-major: each row's ties are one contiguous run
    if tied.numel() == 0 or int(need.max()) == 0:
        return out
    n_tied = torch.bincount(tied[:, 0], minlength=values.shape[0])
    noise = torch.rand(tied.shape[0], generator=generator, device=generator.device)
    chosen = _top_per_run(noise, tied[:, 0], n_tied, need)
    out[tied[chosen, 0], tied[chosen, 1]] = True
    return out


# ----------------------------------------------------------------------------- the engine


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _device(layer: SparseLowRankLinear) -> torch.device:
    """Where the layer's sparse branch lives."""
    return layer.storage.parameter(layer).device


class TopologyEngine:
    """Owns the masks of `layers` and evolves them by CHTs (or SET; or keeps them: static).

    layers: name -> `SparseLowRankLinear` with a sparse branch (S in either storage; `group_rows`:
      rows per topology group or None), e.g. `model.sparse_layers()`. Supports are updated in place.
    total_steps: training iterations of the run (T_end = t_end_fraction · total_steps).
    mode: "chts" (soft removal + CH2-L3n regrowth), "set" (magnitude removal + uniformly random
      regrowth) or "static" (BRF with randomness 1, i.e. uniform random support; never updated).
    update_interval: ΔT in iterations; zeta: ζ of the removal schedule ζ_t = ζ/2·(1 + cos(π t/T_end));
    temperature: (T0, T1) of the removal temperature T = T0 + t·(T1 − T0)/T_end (chts only);
    brf_randomness: r of the BRF init (0 for CHTsL, 0.25 for the CHTs baseline; static uses 1);
    per_head: groups of `layer.group_rows` rows (one attention head of q/k/v) instead of whole layers;
    regrow: "topk" (highest CH2-L3n scores) or "sample" (∝ score); seed: seed of the engine's RNG.

    Under torch.distributed every rank must call `init_masks`/`update` together: the removal uses
    the rank-averaged weights, rank 0 decides, the masks are broadcast, all ranks end identical.
    """

    def __init__(
        self,
        layers: Mapping[str, SparseLowRankLinear],
        *,
        total_steps: int,
        mode: Mode = "chts",
        update_interval: int = 100,
        zeta: float = 0.1,
        t_end_fraction: float = 0.75,
        temperature: tuple[float, float] = (1.0, 9.0),
        brf_randomness: float = 0.0,
        per_head: bool = True,
        regrow: RegrowRule = "topk",
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown topology mode {mode!r}; valid: {', '.join(MODES)}")
        if regrow not in REGROW_RULES:
            raise ValueError(f"unknown regrowth rule {regrow!r}; valid: {', '.join(REGROW_RULES)}")
        if total_steps < 1 or update_interval < 1:
            raise ValueError("total_steps and update_interval must be >= 1")
        if not 0.0 <= zeta <= 1.0 or not 0.0 < t_end_fraction <= 1.0:
            raise ValueError("zeta must be in [0, 1] and t_end_fraction in (0, 1]")
        if not 0.0 <= brf_randomness <= 1.0:
            raise ValueError(f"brf_randomness must be in [0, 1], got {brf_randomness}")
        for name, layer in layers.items():
            if not getattr(layer, "has_sparse", False):
                raise ValueError(f"layer {name!r} has no sparse branch for the topology engine")
            rows = layer.group_rows
            if rows is not None and layer.out_features % rows:
                raise ValueError(f"layer {name!r}: group_rows {rows} does not divide {layer.out_features}")
        # Sorted names: the RNG is consumed in a fixed order whatever order the caller's dict has.
        self.layers: dict[str, SparseLowRankLinear] = {n: layers[n] for n in sorted(layers)}
        self.total_steps, self.mode, self.update_interval = total_steps, mode, update_interval
        self.zeta, self.t_end_fraction = zeta, t_end_fraction
        self.temperature = (float(temperature[0]), float(temperature[1]))
        self.brf_randomness, self.per_head, self.regrow, self.seed = brf_randomness, per_head, regrow, seed
        self.t_end = t_end_fraction * total_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.n_updates = 0  # updates done so far (the schedule position, with last_update_step)
        self.last_update_step = 0
        for name, layer in self.layers.items():
            if not layer.storage.holds_dense:  # its link count is fixed: every group must be at its target
                need = self.target_links(layer) * (layer.out_features // self.group_rows(layer))
                have = layer.storage.n_links(layer)
                if need != have:
                    raise ValueError(f"layer {name!r}: {layer.storage.name} storage holds {have} links, the engine's "
                                     f"groups need {need} (per_head must match)")

    # ------------------------------------------------------------------ schedules

    def is_update_step(self, step: int) -> bool:
        """Whether iteration `step` (1-based) is a topology update (its optimizer step is skipped).

        Only while ζ_t > 0, i.e. step < T_end: at T_end ζ_t = 0 removes (and regrows) nothing, and
        an update would still skip an optimizer step and restart the LR warm-up for no change."""
        return self.mode != "static" and step >= 1 and step % self.update_interval == 0 and step < self.t_end

    def zeta_at(self, step: int) -> float:
        """Removal fraction ζ_t = ζ/2·(1 + cos(π t/T_end)), t = min(step, T_end)."""
        return self.zeta / 2.0 * (1.0 + math.cos(math.pi * min(step, self.t_end) / self.t_end))

    def temperature_at(self, step: int) -> float:
        """Removal temperature T = T0 + t·(T1 − T0)/T_end, t = min(step, T_end)."""
        t0, t1 = self.temperature
        return t0 + min(step, self.t_end) * (t1 - t0) / self.t_end

    def group_rows(self, layer: SparseLowRankLinear) -> int:
        """Rows per topology group of `layer`: its head rows when per_head, else the whole layer."""
        return layer.group_rows if (self.per_head and layer.group_rows) else layer.out_features

    def target_links(self, layer: SparseLowRankLinear) -> int:
        """Target active links of one group of `layer`: floor((1 − s)·n_group)."""
        return link_count(self.group_rows(layer) * layer.in_features, layer.sparsity)

    # ------------------------------------------------------------------ masks

    def _layer_generator(self, device: torch.device) -> torch.Generator:
        """A fresh generator on `device`, seeded from the engine's CPU generator.

        Every rank draws the seed (cheap), so the engine generators stay in step across ranks
        even though only rank 0 uses the layer generators; random numbers are then made on the
        layer's device without host-to-device copies.
        """
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def init_masks(self, init_std: float = 0.02) -> None:
        """Draws every layer's mask by BRF (static: randomness 1) and S's initial values on it.

        The values are drawn afresh (N(0, `init_std`²), the model's `initializer_range`; see
        `init_sparse_values`) from this engine's generator: keeping the construction-time values
        would leave the ≈ (1 − density) share of BRF links outside the construction mask at zero.
        """
        randomness = 1.0 if self.mode == "static" else self.brf_randomness
        for layer in self.layers.values():
            gen = self._layer_generator(_device(layer))
            mask = brf_mask(layer.out_features, layer.in_features, layer.sparsity, randomness, gen)
            mask = self._fit_groups_to_target(mask, layer, gen)
            if _distributed():  # identical by construction; the broadcast makes sure of it
                code = mask.to(torch.uint8)
                dist.broadcast(code, src=0)
                mask = code.bool()
            layer.storage.remap(layer, layer.support_mask() & mask, mask, None)
            init_sparse_values(layer, init_std, gen)

    def _fit_groups_to_target(
        self, mask: torch.Tensor, layer: SparseLowRankLinear, generator: torch.Generator
    ) -> torch.Tensor:
        """`mask` with every group at exactly `target_links`: BRF counts links per layer, while the
        budget (and `chtsl info`) counts them per topology group, and removal never cuts a group above
        target. Surplus links are dropped and missing ones added uniformly at random (±a few links)."""
        rows, target = self.group_rows(layer), self.target_links(layer)
        counts = group_counts(mask, rows)
        if bool((counts == target).all()):
            return mask
        grouped = mask.reshape(counts.numel(), -1)
        keys = _tie_broken_key(torch.zeros(grouped.shape, device=mask.device), grouped, generator)
        kept = _top_per_row(keys, counts.clamp(max=target)).reshape(mask.shape)
        added = regrow_links(None, kept, (target - counts).clamp(min=0), group_rows=rows, generator=generator)
        return kept | added

    @torch.no_grad()
    def apply_masks(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After an optimizer step: weight *= mask and Adam `exp_avg`/`exp_avg_sq` *= mask (masked
        storage; csr holds nothing outside its support)."""
        for layer in self.layers.values():
            layer.storage.after_step(layer, optimizer)

    # ------------------------------------------------------------------ update

    def _decide(
        self, layer: SparseLowRankLinear, old: torch.Tensor, weight_abs: torch.Tensor, zeta_t: float, temp: float,
        gen: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kept, new mask, stats (len(_STAT_FIELDS),) float64) of one layer from its support `old`
        (bool out × in) and |S| (float out × in); rank 0 only."""
        rows = self.group_rows(layer)
        n_groups = layer.out_features // rows
        old = old.to(torch.bool)
        kept = soft_removal(
            weight_abs, old, group_rows=rows, zeta_t=zeta_t,
            temperature=temp if self.mode == "chts" else None, generator=gen,
        )
        n_kept = kept.reshape(n_groups, -1).sum(1)
        # A group left above its target (possible only if it started above) gets no regrowth and
        # no extra removal: removal never takes more than the schedule says.
        n_regrow = (self.target_links(layer) - n_kept).clamp(min=0)
        scores = ch2_l3n_scores(kept) if self.mode == "chts" else None
        grown = regrow_links(
            scores, kept, n_regrow, group_rows=rows, generator=gen, sample=self.regrow == "sample"
        )
        new = kept | grown
        removed = old & ~kept
        # Counts from the group counts where they are known (each bool pass over out × in costs).
        n_old, n_kept_all, n_grown = old.sum(), n_kept.sum(), n_regrow.sum()
        stats = torch.stack([
            n_old, n_old - n_kept_all, n_grown, n_kept_all + n_grown, (old & ~new).sum(),
        ]).to(torch.float64)
        removed_abs_sum = weight_abs[removed].to(torch.float64).sum().reshape(1)
        return kept, new, torch.cat([stats, removed_abs_sum])

    @torch.no_grad()
    def update(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """One topology update at iteration `step` (1 <= step <= T_end) of every layer.

        Removal by soft magnitude (chts) or magnitude (set) per group, regrowth back to each
        group's target, then weights, gradients and Adam moments of removed and regrown links are
        zeroed (regrown links start at w = 0 with zero moments). Returns stats for logging:
        {"step", "zeta", "temperature", "time_s" (wall seconds of the whole update), "removed",
        "regrown", "active", "frac_changed", "layers": {name: {"removed", "regrown", "active",
        "frac_changed", "removed_mean_abs_w"}}}. `frac_changed`: fraction of the links before the
        update that are no longer in the mask; `removed_mean_abs_w`: mean |w| (rank-averaged
        weights) of the links taken out by removal, NaN if none.
        """
        if self.mode == "static":
            raise RuntimeError("a static topology is never updated")
        if not 1 <= step < self.t_end:
            raise ValueError(f"topology updates happen for 1 <= step < T_end = {self.t_end}, got {step}")
        start = time.perf_counter()
        zeta_t, temp = self.zeta_at(step), self.temperature_at(step)
        distributed = _distributed()
        world = dist.get_world_size() if distributed else 1
        rank0 = _rank() == 0
        rows: list[torch.Tensor] = []
        for layer in self.layers.values():
            storage = layer.storage
            device = _device(layer)
            gen = self._layer_generator(device)
            # S's parameter is reduced (csr: the values (nnz,), not a dense matrix)
            weight = storage.parameter(layer).detach().to(torch.float32)
            if distributed:
                weight = weight.clone()  # .to() aliases a float32 weight; reduce works in place
                dist.reduce(weight, dst=0, op=dist.ReduceOp.SUM)
                weight /= world
            if rank0:
                weight_abs = storage.to_dense(layer, weight.abs())  # transient float32 (out × in)
                kept, new, stats = self._decide(layer, layer.support_mask(), weight_abs, zeta_t, temp, gen)
                del weight_abs
            else:
                stats = torch.zeros(len(_STAT_FIELDS), dtype=torch.float64, device=device)
            if distributed:  # one uint8 broadcast carries both masks: bit 0 kept, bit 1 new
                if rank0:
                    code = kept.to(torch.uint8) + 2 * new.to(torch.uint8)
                else:
                    code = torch.empty((layer.out_features, layer.in_features), dtype=torch.uint8, device=device)
                dist.broadcast(code, src=0)
                kept, new = (code & 1).bool(), (code >> 1).bool()
            storage.remap(layer, kept, new, optimizer)
            rows.append(stats.to(device))
        table = torch.stack(rows) if rows else torch.zeros(0, len(_STAT_FIELDS), dtype=torch.float64)
        if distributed and rows:
            dist.broadcast(table, src=0)
        if table.is_cuda:
            torch.cuda.synchronize(table.device)  # the wall time must include the queued GPU work
        self.n_updates += 1
        self.last_update_step = step
        return self._stats(step, zeta_t, temp, table.cpu(), time.perf_counter() - start)

    def _stats(
        self, step: int, zeta_t: float, temp: float, table: torch.Tensor, seconds: float
    ) -> dict[str, Any]:
        per_layer: dict[str, dict[str, float | int]] = {}
        for name, row in zip(self.layers, table.tolist(), strict=True):
            f = dict(zip(_STAT_FIELDS, row, strict=True))
            per_layer[name] = {
                "removed": int(f["removed"]),
                "regrown": int(f["regrown"]),
                "active": int(f["active_after"]),
                "frac_changed": f["lost"] / f["active_before"] if f["active_before"] else 0.0,
                "removed_mean_abs_w": f["removed_abs_sum"] / f["removed"] if f["removed"] else math.nan,
            }
        totals = table.sum(0).tolist() if table.numel() else [0.0] * len(_STAT_FIELDS)
        t = dict(zip(_STAT_FIELDS, totals, strict=True))
        return {
            "step": step,
            "zeta": zeta_t,
            "temperature": temp if self.mode == "chts" else math.nan,
            "time_s": seconds,
            "removed": int(t["removed"]),
            "regrown": int(t["regrown"]),
            "active": int(t["active_after"]),
            "frac_changed": t["lost"] / t["active_before"] if t["active_before"] else 0.0,
            "layers": per_layer,
        }

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Plain state: CPU tensors under "mask.<layer>" and "rng_state" (uint8), the rest ints/str.

        Save the tensors with safetensors and the other entries as JSON; no pickling needed. Only
        layers whose storage holds S dense (masked) have a "mask.<layer>" entry; a csr layer's support
        is the model's own CSR (a dense bool copy would be larger than the whole sparse layer).
        """
        state: dict[str, Any] = {f"mask.{name}": layer.support_mask().detach().to("cpu", torch.bool).clone()
                                 for name, layer in self.layers.items() if layer.storage.holds_dense}
        state["rng_state"] = self.generator.get_state().clone()
        state.update(
            n_updates=self.n_updates, last_update_step=self.last_update_step, seed=self.seed,
            mode=self.mode, update_interval=self.update_interval, total_steps=self.total_steps,
        )
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores masks (in place, weights re-masked), the schedule position and the RNG state.

        A layer without a "mask.<layer>" entry keeps the support its model state brought (always the
        case for csr layers, whose support is the model's CSR; and for a masked layer resumed from a
        csr-storage checkpoint, whose mask was converted with the model state). A masked layer
        needs a mask entry when the state has any."""
        names = {k.removeprefix("mask.") for k in state if k.startswith("mask.")}
        masked = {n for n, layer in self.layers.items() if layer.storage.holds_dense}
        extra = names - set(self.layers)
        missing = (masked - names) if names else set()
        if extra or missing:
            raise ValueError(f"topology state does not match the layers: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]}")
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"topology state is for mode {state['mode']!r}, engine is {self.mode!r}")
        for name in masked & names:
            layer = self.layers[name]
            mask = torch.as_tensor(state[f"mask.{name}"]).to(_device(layer), torch.bool)
            layer.storage.remap(layer, mask, mask, None)  # the saved support, S re-masked on it
        self.generator.set_state(torch.as_tensor(state["rng_state"]).to("cpu", torch.uint8))
        self.n_updates = int(state["n_updates"])
        self.last_update_step = int(state["last_update_step"])


def group_counts(mask: torch.Tensor, group_rows: int) -> torch.Tensor:
    """Active links per group of `group_rows` consecutive rows: (out // group_rows,) int64."""
    return mask.reshape(mask.shape[0] // group_rows, -1).sum(1)

