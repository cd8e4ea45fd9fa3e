"""The CHTsL linear layer and the losses/diagnostics on its two branches (docs/method.md §1–§2).

`SparseLowRankLinear` maps `(..., in_features) -> (..., out_features)` as

    y = S x + scale · B σ(A x)

where `A` (r × in) and `B` (out × r) are dense low-rank factors and σ an activation, and the
sparse `S` (out × in) is held by one of the storages of `chtsl_infer.model.storage` (`layer.storage`),
which the layer asks for everything that depends on how S is held:

- `masked`: a dense `weight` (out × in) times a boolean `mask` buffer (the classic training form:
  weight, gradient and Adam moments are all dense);
- `csr`: the active links only, a `values` Parameter (nnz,) plus the CSR support as the buffers
  `crow_indices` int32 (out+1,) and `col_indices` int16/int32 (nnz,) — the packed export's layout
  (docs/formats.md §2), so a checkpoint of a csr layer is its packed form. Forward and backward run through
  `chtsl_infer.model.csr.csr_linear`; no dense (out × in) float tensor of S exists (gradient, optimizer
  state and checkpoint are all ∝ nnz).

One class covers every method of the paper by configuration (`chtsl_infer.model.methods`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from chtsl_infer.model.methods import DEFAULT_METHOD, get_method
from chtsl_infer.model.storage import DEFAULT_STORAGE, TENSOR_NAMES, check_storage, get_storage

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

    Parameters (present according to `method` and `storage`; absent ones are None):
      weight  (out, in)  masked: dense values of S (zero outside the mask); `dense`: the full matrix
      mask    (out, in)  masked: bool buffer, the support of S (saved with the model)
      values  (nnz,)     csr: the active links of S, in the CSR order of the support
      crow_indices (out+1,) int32, col_indices (nnz,) int16/int32   csr: the support of S
      lora_A  (r, in)    low-rank down-projection A
      lora_B  (out, r)   low-rank up-projection B
    `group_rows` is the number of rows forming one topology group (head_dim for q/k/v), or None.
    `storage` names how S is held (`chtsl_infer.model.storage.STORAGES`); `self.storage` is that object.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        method: str = DEFAULT_METHOD,
        sparsity: float = 0.0,
        rank: int = 0,
        activation: str | None = None,
        alpha: float | None = None,
        group_rows: int | None = None,
        storage: str = DEFAULT_STORAGE,
    ) -> None:
        super().__init__()
        spec = get_method(method)
        check_storage(method, storage)
        has_sparse, has_lowrank = spec.has_sparse, spec.has_lowrank
        if has_sparse and not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if has_lowrank and rank <= 0:
            raise ValueError(f"method {method!r} needs a positive rank, got {rank}")
        activation = activation or spec.activation
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
        self.scale = spec.lowrank_scale(alpha, rank)
        self.has_sparse, self.has_lowrank = has_sparse, has_lowrank
        self.recorder: BranchRecorder | None = None  # set by `record_branches`
        self.storage = get_storage(storage)

        for name in TENSOR_NAMES:  # every storage's tensors of S, None unless this layer holds them
            setattr(self, name, None)
        if has_sparse:  # one random support drawn for every storage: equal seeds give equal models
            self.storage.build(self, random_mask(out_features, in_features, sparsity, group_rows),
                               layer_link_count(out_features, in_features, sparsity, group_rows))
        elif spec.is_dense:
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if has_lowrank:
            self.lora_A = nn.Parameter(torch.empty(rank, in_features))
            self.lora_B = nn.Parameter(torch.empty(out_features, rank))
        else:
            self.lora_A = self.lora_B = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, "
            f"sparsity={self.sparsity}, rank={self.rank}, activation={self.activation}"
            + (f", storage={self.storage.name}" if self.has_sparse else "")
        )

    # ------------------------------------------------------------------ branches

    def sparse_weight(self) -> torch.Tensor:
        """The effective S (out × in) as a dense tensor (differentiable; export, verification, tests):
        weight × mask (masking keeps gradients off inactive links); the `dense` method: the weight.
        For a csr layer this materialises S; training never calls it."""
        return self.storage.dense(self)

    def support_mask(self) -> torch.Tensor:
        """The support of S as bool (out × in): the mask buffer, or (csr) a transient one."""
        return self.storage.support(self)

    def sparse_branch(self, x: torch.Tensor) -> torch.Tensor:
        """S x: (..., in) -> (..., out)."""
        return self.storage.forward(self, x)

    def lowrank_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """σ(A x): (..., in) -> (..., rank)."""
        assert self.lora_A is not None
        return activation_fn(self.activation, F.linear(x, self.lora_A))

    def lowrank_up(self, hidden: torch.Tensor) -> torch.Tensor:
        """scale · B h: (..., rank) -> (..., out)."""
        assert self.lora_B is not None
        out = F.linear(hidden, self.lora_B)
        return out * self.scale if self.scale != 1.0 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_lowrank:
            return self.sparse_branch(x)
        hidden = self.lowrank_hidden(x)
        low = self.lowrank_up(hidden)
        if not self.has_sparse:
            return low
        sparse = self.sparse_branch(x)
        if self.recorder is not None:
            self.recorder.record(self, x, hidden, sparse, low)
        return sparse + low

    @torch.no_grad()
    def trainable_entries(self) -> int:
        """Number of trainable entries: active links of S plus the entries of A and B."""
        n = self.storage.n_links(self)
        if self.has_lowrank:
            n += self.lora_A.numel() + self.lora_B.numel()
        return n


# ----------------------------------------------------------------------------- branch losses


def alignment_loss(sparse_out: torch.Tensor, lowrank_out: torch.Tensor) -> torch.Tensor:
    """`||S − L||_F / (B·N)` of one layer (docs/method.md §2; the Frobenius norm is not squared).

    `sparse_out`, `lowrank_out`: (B, seq, out) branch outputs; B·N is their element count.
    Computed in fp32 so a bf16 autocast forward does not lose the small differences.
    The reference form: training uses `layer_alignment`, same value and gradient, less memory.
    """
    diff = (sparse_out.float() - lowrank_out.float()).flatten()
    return torch.linalg.vector_norm(diff) / diff.numel()


class _RecomputedAlignment(torch.autograd.Function):
    """`alignment_loss` whose backward recomputes the branch difference from the layer input.

    Autograd's norm keeps the (B, seq, out) fp32 difference of every aligned layer from forward to
    backward: ~0.2 GB at llama130m with micro-batch 2 × 256, the largest extra activation of CHTsL
    over act. Recomputing S x and B h in backward (from x and h = σ(A x), which the branches' own
    backward keeps anyway) costs one sparse product and one rank-r GEMM per layer: measured +7-13 %
    of a llama130m csr step on 2 cores, for 0.74× instead of ~0.82× dense's peak RSS.
    """

    @staticmethod
    def forward(ctx, sparse_out, lowrank_out, recompute):  # type: ignore[override]
        diff = sparse_out.float() - lowrank_out.float()
        norm = torch.linalg.vector_norm(diff)
        ctx.recompute, ctx.numel = recompute, diff.numel()
        ctx.dtypes = (sparse_out.dtype, lowrank_out.dtype)
        ctx.save_for_backward(norm)
        return norm / diff.numel()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (norm,) = ctx.saved_tensors
        sparse_out, lowrank_out = ctx.recompute()
        ctx.recompute = None  # drop the references to x and h now, not when the graph is freed
        # d(||d||/n)/dd = d / (||d|| n); 0 where d = 0, as torch's norm backward gives.
        scale = torch.where(norm > 0, grad / (norm.clamp_min(torch.finfo(norm.dtype).tiny) * ctx.numel), 0.0)
        g = sparse_out.float().sub_(lowrank_out).mul_(scale)  # in place: the recomputation's own tensor
        g_low = (-g).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        g_sparse = g.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        return g_sparse, g_low, None


def layer_alignment(
    layer: SparseLowRankLinear, x: torch.Tensor, hidden: torch.Tensor, sparse_out: torch.Tensor,
    lowrank_out: torch.Tensor,
) -> torch.Tensor:
    """`alignment_loss(sparse_out, lowrank_out)` of `layer` at input `x` (`hidden` = σ(A x)), with a
    gradient computed by re-running S x and B h in backward (under the forward's autocast state)
    instead of keeping the branches' difference alive; x and h are kept by the branches' own
    backward anyway. The parameters must not change between forward and backward.
    """
    device = x.device.type
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    def recompute() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), torch.autocast(device, enabled=autocast[0], dtype=autocast[1]):
            return layer.sparse_branch(x), layer.lowrank_up(hidden)

    return _RecomputedAlignment.apply(sparse_out, lowrank_out, recompute)


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


@torch.no_grad()
def rms(x: torch.Tensor) -> float:
    """Root mean square of all elements (a branch output's scale, independent of its shape)."""
    return float(torch.linalg.vector_norm(x.float()) / math.sqrt(max(x.numel(), 1)))


@torch.no_grad()
def branch_grad_norms(layers: Iterable[SparseLowRankLinear]) -> dict[str, float]:
    """L2 norms of the current gradients of S (its storage's parameter: values, or the masked weight
    whose gradient is zero off the mask), of A and of B, each over all `layers` together; a kind with
    no gradient is left out."""
    sums: dict[str, float] = {}
    for layer in layers:
        s = layer.storage.parameter(layer) if layer.has_sparse else None
        for kind, p in (("S", s), ("A", layer.lora_A), ("B", layer.lora_B)):
            if p is not None and p.grad is not None:
                sums[kind] = sums.get(kind, 0.0) + float(p.grad.float().pow(2).sum())
    return {k: math.sqrt(v) for k, v in sums.items()}


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
    sparse_rms: dict[str, float] = field(default_factory=dict)  # RMS of S x per layer (diagnostic)
    lowrank_rms: dict[str, float] = field(default_factory=dict)  # RMS of scale·B σ(A x) per layer

    def record(
        self, layer: SparseLowRankLinear, x: torch.Tensor, hidden: torch.Tensor, sparse_out: torch.Tensor,
        lowrank_out: torch.Tensor,
    ) -> None:
        """Called by `layer.forward` with its input x, σ(A x) and both branch outputs."""
        name = self.names[id(layer)]
        term = None
        if name in self.align_names:
            # A storage of links only (csr) trains for memory: recompute the difference in backward.
            # One holding S dense anyway (masked) keeps it: its recomputation would be a dense GEMM.
            term = (alignment_loss(sparse_out, lowrank_out) if layer.storage.holds_dense
                    else layer_alignment(layer, x, hidden, sparse_out, lowrank_out))
            self.align_terms.append(term)
        if self.diagnostics:
            self.ocr[name] = ocr(sparse_out, lowrank_out)
            self.cosine[name] = branch_cosine(sparse_out, lowrank_out)
            self.sparse_rms[name] = rms(sparse_out)
            self.lowrank_rms[name] = rms(lowrank_out)
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
