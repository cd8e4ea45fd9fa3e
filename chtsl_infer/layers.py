"""The CHTsL linear layer and the losses/diagnostics on its two branches (docs/method.md §1–§2).

`SparseLowRankLinear` maps `(..., in_features) -> (..., out_features)` as

    y = S x + scale · B σ(A x)

where `S` (out × in) is a dense weight times a boolean mask (the training form of an unstructured
sparse matrix), `A` (r × in) and `B` (out × r) are dense low-rank factors and σ an activation.
One class covers every method of the paper by configuration (see `METHODS`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

#: method -> (has sparse branch, has low-rank branch, default activation of the low-rank branch)
METHODS: dict[str, tuple[bool, bool, str]] = {
    "dense": (False, False, "identity"),  # plain Linear: `weight` is the full dense matrix
    "chts": (True, False, "identity"),  # S only
    "cola": (False, True, "silu"),  # B σ(A x) only
    "sltrain": (True, True, "identity"),  # static S + (α/r) B A x
    "naive": (True, True, "identity"),  # S + B A x
    "act": (True, True, "silu"),  # S + B σ(A x)
    "chtsl": (True, True, "silu"),  # act + alignment loss
}
ACTIVATIONS = ("silu", "relu", "gelu", "identity")
LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def activation_fn(name: str, x: torch.Tensor) -> torch.Tensor:
    """Applies the low-rank branch activation `name` (one of `ACTIVATIONS`)."""
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "identity":
        return x
    raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")


def link_count(n_positions: int, sparsity: float) -> int:
    """Target number of active links for `n_positions` weights at `sparsity` s: floor((1-s)·n)."""
    # The small epsilon keeps e.g. (1-0.95)*400 = 19.999999 from flooring to 19.
    return max(1, math.floor((1.0 - sparsity) * n_positions + 1e-9))


def layer_link_count(out_features: int, in_features: int, sparsity: float, group_rows: int | None = None) -> int:
    """Active links of a layer kept at its target: Σ over row groups of `link_count(group, s)`."""
    rows = group_rows or out_features
    return (out_features // rows) * link_count(rows * in_features, sparsity)


def random_mask(
    out_features: int,
    in_features: int,
    sparsity: float,
    group_rows: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniformly random support, bool (out × in), with exactly `link_count` links per row group.

    The model's default support (random-weight benchmarks, SLTrain's static support); training
    re-initialises masks with the CHTs topology engine (BRF).
    """
    rows = group_rows or out_features
    n = rows * in_features
    k = link_count(n, sparsity)
    groups = []
    for _ in range(out_features // rows):
        g = torch.zeros(n, dtype=torch.bool)
        g[torch.randperm(n, generator=generator)[:k]] = True
        groups.append(g.view(rows, in_features))
    return torch.cat(groups)


class SparseLowRankLinear(nn.Module):
    """`y = S x + scale · B σ(A x)` for one block linear (q, k, v, o, gate, up or down).

    Parameters (present according to `method`):
      weight  (out, in)  dense values of S (zero outside the mask) or, for `dense`, the full matrix
      mask    (out, in)  bool buffer, the support of S (saved with the model)
      lora_A  (r, in)    low-rank down-projection A
      lora_B  (out, r)   low-rank up-projection B
    `group_rows` is the number of rows forming one topology group (head_dim for q/k/v), or None.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        method: str = "chtsl",
        sparsity: float = 0.0,
        rank: int = 0,
        activation: str | None = None,
        alpha: float | None = None,
        group_rows: int | None = None,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        has_sparse, has_lowrank, default_act = METHODS[method]
        if has_sparse and not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if has_lowrank and rank <= 0:
            raise ValueError(f"method {method!r} needs a positive rank, got {rank}")
        activation = activation or default_act
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if group_rows is not None and out_features % group_rows:
            raise ValueError(f"group_rows {group_rows} does not divide out_features {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.method = method
        self.sparsity = sparsity if has_sparse else 0.0
        self.rank = rank if has_lowrank else 0
        self.activation = activation if has_lowrank else "identity"
        self.group_rows = group_rows
        # SLTrain scales its linear low-rank product by α/r; every other method by 1.
        self.scale = (alpha or 32.0) / rank if method == "sltrain" else 1.0
        self.has_sparse, self.has_lowrank = has_sparse, has_lowrank
        self.recorder: BranchRecorder | None = None  # set by `record_branches`

        self.weight = (
            nn.Parameter(torch.empty(out_features, in_features)) if method != "cola" else None
        )
        if has_sparse:
            self.register_buffer("mask", random_mask(out_features, in_features, sparsity, group_rows))
        else:
            self.mask = None
        if has_lowrank:
            self.lora_A = nn.Parameter(torch.empty(rank, in_features))
            self.lora_B = nn.Parameter(torch.empty(out_features, rank))
        else:
            self.lora_A = self.lora_B = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, "
            f"sparsity={self.sparsity}, rank={self.rank}, activation={self.activation}"
        )

    def sparse_weight(self) -> torch.Tensor:
        """The effective S (out × in): weight × mask (masking keeps gradients off inactive links)."""
        assert self.weight is not None
        return self.weight * self.mask if self.mask is not None else self.weight

    def sparse_branch(self, x: torch.Tensor) -> torch.Tensor:
        """S x: (..., in) -> (..., out)."""
        return F.linear(x, self.sparse_weight())

    def lowrank_branch(self, x: torch.Tensor) -> torch.Tensor:
        """scale · B σ(A x): (..., in) -> (..., out), as two skinny GEMMs (B A is never formed)."""
        assert self.lora_A is not None and self.lora_B is not None
        out = F.linear(activation_fn(self.activation, F.linear(x, self.lora_A)), self.lora_B)
        return out * self.scale if self.scale != 1.0 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_lowrank:
            return self.sparse_branch(x)
        low = self.lowrank_branch(x)
        if not self.has_sparse:
            return low
        sparse = self.sparse_branch(x)
        if self.recorder is not None:
            self.recorder.record(self, sparse, low)
        return sparse + low

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The dense (out × in) matrix of the layer when it is linear (no activation); for tests."""
        w = self.sparse_weight() if self.weight is not None else torch.zeros(self.out_features, self.in_features)
        if self.has_lowrank:
            if self.activation != "identity":
                raise ValueError("a layer with a non-linear low-rank branch has no single weight matrix")
            w = w + self.scale * self.lora_B @ self.lora_A
        return w

    def trainable_entries(self) -> int:
        """Number of trainable entries: active links of S plus the entries of A and B."""
        n = 0
        if self.weight is not None:
            n += int(self.mask.sum()) if self.mask is not None else self.weight.numel()
        if self.has_lowrank:
            n += self.lora_A.numel() + self.lora_B.numel()
        return n


# ----------------------------------------------------------------------------- branch losses


def alignment_loss(sparse_out: torch.Tensor, lowrank_out: torch.Tensor) -> torch.Tensor:
    """`||S − L||_F / (B·N)` of one layer (docs/method.md §2; the Frobenius norm is not squared).

    `sparse_out`, `lowrank_out`: (B, seq, out) branch outputs; B·N is their element count.
    Computed in fp32 so a bf16 autocast forward does not lose the small differences.
    """
    diff = (sparse_out.float() - lowrank_out.float()).flatten()
    return torch.linalg.vector_norm(diff) / diff.numel()


@torch.no_grad()
def ocr(sparse_out: torch.Tensor, lowrank_out: torch.Tensor, eps: float = 1e-12) -> float:
    """Output cancellation ratio in [0, 1): Σ min(|S|,|L|)·1[S·L<0] / (Σ min(|S|,|L|) + ε)."""
    s, low = sparse_out.float(), lowrank_out.float()
    overlap = torch.minimum(s.abs(), low.abs())
    cancel = (overlap * (s * low < 0)).sum()
    return float(cancel / (overlap.sum() + eps))


@torch.no_grad()
def branch_cosine(sparse_out: torch.Tensor, lowrank_out: torch.Tensor) -> float:
    """Cosine similarity of the flattened branch outputs."""
    return float(F.cosine_similarity(sparse_out.float().flatten(), lowrank_out.float().flatten(), dim=0))


@dataclass
class BranchRecorder:
    """Collects, during one forward, what the trainer needs from the two branches of each layer.

    Only scalars are kept: the alignment term (with its graph, for backward) of the layers in
    `align_names`, and OCR/cosine floats when `diagnostics` is set, so no activation outlives the
    forward unless autograd needs it anyway.
    """

    align_names: frozenset[str] = frozenset()
    diagnostics: bool = False
    names: dict[int, str] = field(default_factory=dict)
    align_terms: list[torch.Tensor] = field(default_factory=list)
    ocr: dict[str, float] = field(default_factory=dict)
    cosine: dict[str, float] = field(default_factory=dict)
    align: dict[str, float] = field(default_factory=dict)  # L_align^(l) of every hybrid layer (diagnostic)

    def record(self, layer: SparseLowRankLinear, sparse_out: torch.Tensor, lowrank_out: torch.Tensor) -> None:
        name = self.names[id(layer)]
        term = None
        if name in self.align_names:
            term = alignment_loss(sparse_out, lowrank_out)
            self.align_terms.append(term)
        if self.diagnostics:
            self.ocr[name] = ocr(sparse_out, lowrank_out)
            self.cosine[name] = branch_cosine(sparse_out, lowrank_out)
            # Measured for every hybrid layer, optimised or not, so methods can be compared.
            with torch.no_grad():
                self.align[name] = float(term if term is not None else alignment_loss(sparse_out, lowrank_out))

    def alignment(self) -> torch.Tensor | None:
        """Σ_l L_align^(l) over the recorded layers (None when no layer was aligned)."""
        return torch.stack(self.align_terms).sum() if self.align_terms else None


@contextmanager
def record_branches(
    layers: dict[str, SparseLowRankLinear], align: set[str] | frozenset[str] = frozenset(), diagnostics: bool = False
) -> Iterator[BranchRecorder]:
    """Within the block, every layer of `layers` with both branches reports to one recorder."""
    recorder = BranchRecorder(align_names=frozenset(align), diagnostics=diagnostics)
    recorder.names = {id(layer): name for name, layer in layers.items()}
    for layer in layers.values():
        layer.recorder = recorder
    try:
        yield recorder
    finally:
        for layer in layers.values():
            layer.recorder = None
