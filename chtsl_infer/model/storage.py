"""How a sparse layer holds S (out × in) in training: one object per storage, a registry by name,
choosing one (`auto`), and moving model and optimizer state between them.

- `masked` (`MaskedStorage`): a dense `weight` (out × in) times a bool `mask` buffer. Weight,
  gradient and both Adam moments are dense. It also holds the `dense` method's plain weight (no mask).
- `csr` (`CsrStorage`): `values` (nnz,) over a CSR support (`crow_indices`, `col_indices`, the packed
  layout of docs/formats.md §2); gradient and Adam moments are (nnz,) too, and no dense (out × in)
  float tensor of S exists in training.

A `SparseLowRankLinear` keeps its storage in `layer.storage` and asks it for everything that depends
on how S is held, as PEFT's LoRA variants are asked by their layer: the sparse branch's forward, a
dense view, the trainable tensor of S and the layout of its optimizer state, the topology engine's
remap, and the conversion to and from the CSR triple, which every storage expresses exactly (both
hold the support exactly): checkpoints (`convert_state_dict`), optimizer moments
(`convert_optimizer_state`) and live models (`to_storage`) move between storages through it. The
storage objects are stateless singletons: S lives on the layer as the parameter and buffers named by
`tensors`, which are also the layer's checkpoint entries. docs/contributing.md ("Sparse storage")
lists the interface.

`resolve_storage` turns `--sparse-storage auto|masked|csr` into a storage name, with the reason
printed and logged by `chtsl train`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from chtsl_infer.errors import ChtslError
from chtsl_infer.model.csr import CsrStructure, col_index_dtype, csr_linear, mask_to_csr
from chtsl_infer.model.methods import METHODS, Method, get_method

#: The layer a storage holds S for: a `SparseLowRankLinear` (model/layers.py). Named as an `nn.Module`
#: because layers.py imports this module, and a storage needs only the layer's attributes.
Layer = nn.Module

#: Adam/AdamW state entries shaped like the parameter (`max_exp_avg_sq` only with amsgrad).
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _moments(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> list[torch.Tensor]:
    """The optimizer's state tensors of `param` shaped like it (Adam's moments); [] when none."""
    state = optimizer.state.get(param) if optimizer is not None else None
    if not state:
        return []
    return [m for k in MOMENT_KEYS if isinstance(m := state.get(k), torch.Tensor) and m.shape == param.shape]


def _rows(crow: torch.Tensor) -> torch.Tensor:
    """Row of each CSR entry: int64 (nnz,), ascending (expands the row pointers `crow` (out+1,))."""
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)


class SparseStorage(ABC):
    """How S (out × in) of a `SparseLowRankLinear` is held. Stateless: every method takes the layer
    (or bare tensors), whose parameter and buffers named by `tensors` hold S.

    Tensor layouts: "S's layout" is the shape of `parameter(layer)` (masked: (out × in); csr: (nnz,));
    "links" are (nnz,) tensors in the row-major CSR order of the support (rows ascending, columns
    ascending within a row: the order of `mask.nonzero()`), at the coordinates `coordinates(layer)`.
    """

    name: ClassVar[str]
    param: ClassVar[str]  # the layer attribute holding S's trainable tensor
    tensors: ClassVar[tuple[str, ...]]  # S's parameter and buffers on the layer = its checkpoint entries, param first
    #: S is held in (out × in) tensors. Then a dense copy of S or its support costs nothing extra: the
    #: topology engine saves the support with its state and the alignment loss keeps the branches'
    #: difference instead of recomputing it. Otherwise only the links are held: the link count is fixed
    #: by the tensors' shapes (the topology keeps every group at its target), and the layer needs a
    #: sparse branch (the `dense` method's full weight is held `masked`, without a mask).
    holds_dense: ClassVar[bool]

    @property
    def support_buffers(self) -> tuple[str, ...]:
        """The buffers holding the support (identical on every rank under DDP)."""
        return self.tensors[1:]

    # ------------------------------------------------------------------ the layer

    @abstractmethod
    def build(self, layer: Layer, mask: torch.Tensor, nnz: int) -> None:
        """Allocates S on `layer` at construction with support `mask` (bool out × in; the layer's
        `layer_link_count`, `nnz`, links), values uninitialised. On the meta device only the shapes."""

    @abstractmethod
    def forward(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """S x: (..., in) -> (..., out), differentiable in x and `parameter(layer)`."""

    def parameter(self, layer: Layer) -> nn.Parameter | None:
        """S's trainable tensor (what the optimizer updates); None for a layer without S or weight."""
        return getattr(layer, self.param)

    def dense(self, layer: Layer) -> torch.Tensor:
        """S as a dense (out × in) tensor, differentiable (export, verification, tests; not training)."""
        return self.to_dense(layer, self.parameter(layer))

    @abstractmethod
    def to_dense(self, layer: Layer, t: torch.Tensor) -> torch.Tensor:
        """A tensor in S's layout (values, |values|, a moment) as (out × in), zero off the support."""

    @abstractmethod
    def from_dense(self, layer: Layer, dense: torch.Tensor) -> torch.Tensor:
        """A dense (out × in) tensor restricted to the support, in S's layout (initialisation)."""

    @abstractmethod
    def support(self, layer: Layer) -> torch.Tensor:
        """The support of S as bool (out × in) (transient for csr)."""

    @abstractmethod
    def coordinates(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) int64 (nnz,) of the links, in CSR order."""

    @abstractmethod
    def n_links(self, layer: Layer) -> int:
        """Trainable entries of S: its active links (the `dense` method: every entry; no S: 0)."""

    # ------------------------------------------------------------------ training

    @abstractmethod
    def after_step(self, layer: Layer, optimizer: torch.optim.Optimizer | None) -> None:
        """After an optimizer step: S and its moments zero off the support again."""

    @abstractmethod
    def remap(self, layer: Layer, kept: torch.Tensor, new: torch.Tensor,
              optimizer: torch.optim.Optimizer | None) -> None:
        """Moves S onto the support `new` (bool out × in) after a topology update: the links of `kept`
        (in both the old and the new support) keep their value, gradient and moments; every other
        link starts at 0 with zero moments. In place: parameter and moments keep their identity."""

    # ------------------------------------------------------------------ conversion

    @abstractmethod
    def check(self, name: str, entries: Mapping[str, torch.Tensor], out_features: int, in_features: int) -> None:
        """ValueError naming layer `name` unless `entries` (S's checkpoint tensors by `tensors` name)
        are consistent in what a safetensors header's names and shapes cannot show."""

    @abstractmethod
    def to_csr(self, entries: Mapping[str, torch.Tensor], out_features: int, in_features: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(crow int32 (out+1,), col int16/int32 (nnz,), values (nnz,)) of S held as `entries`."""

    @abstractmethod
    def from_csr(self, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out_features: int,
                 in_features: int) -> dict[str, torch.Tensor]:
        """S's checkpoint tensors (by `tensors` name) of a CSR triple; `values` keep their dtype."""

    @abstractmethod
    def to_links(self, t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """A tensor in S's layout (e.g. an Adam moment) as links (nnz,) at (rows, cols)."""

    @abstractmethod
    def from_links(self, links: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   shape: tuple[int, int]) -> torch.Tensor:
        """Links (nnz,) at (rows, cols) of an S of `shape` (out, in) as a tensor in S's layout."""

    def csr(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The CSR triple of `layer`'s S, detached, on CPU (the packed export's layout)."""
        entries = {k: getattr(layer, k).detach().cpu() for k in self.tensors}
        return self.to_csr(entries, layer.out_features, layer.in_features)

    def install(self, layer: Layer, entries: Mapping[str, torch.Tensor]) -> None:
        """Makes `entries` (this storage's tensors) `layer`'s S: `param` a Parameter, the rest buffers;
        every other storage's tensor names become None. New parameters: build an optimizer afterwards."""
        for k in TENSOR_NAMES:  # parameters, buffers and plain None attributes alike
            layer._parameters.pop(k, None)
            layer._buffers.pop(k, None)
            layer.__dict__.pop(k, None)
            t = entries.get(k)
            if t is None:
                setattr(layer, k, None)
            elif k == self.param:
                layer.register_parameter(k, nn.Parameter(t))
            else:
                layer.register_buffer(k, t)
        layer.storage = self

    def __deepcopy__(self, memo: dict) -> SparseStorage:
        return self  # the registry's objects are singletons (compared with `is`): a model's copy shares them

    def __repr__(self) -> str:
        return f"<{self.name} storage>"


class MaskedStorage(SparseStorage):
    """S = `weight` (out × in) · `mask` (bool out × in buffer); the `dense` method: `weight` alone."""

    name, param, tensors, holds_dense = "masked", "weight", ("weight", "mask"), True

    def build(self, layer: Layer, mask: torch.Tensor, nnz: int) -> None:
        self.install(layer, {"weight": torch.empty(layer.out_features, layer.in_features), "mask": mask})

    def forward(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense(layer))

    def to_dense(self, layer: Layer, t: torch.Tensor) -> torch.Tensor:
        # Masking (not a weight zero off the mask) keeps gradients off inactive links.
        return t * layer.mask if layer.mask is not None else t

    def from_dense(self, layer: Layer, dense: torch.Tensor) -> torch.Tensor:
        return self.to_dense(layer, dense)

    def support(self, layer: Layer) -> torch.Tensor:
        if layer.mask is None:
            raise ValueError(f"method {layer.method!r} has no sparse branch")
        return layer.mask

    def coordinates(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
        return self.support(layer).nonzero(as_tuple=True)

    def n_links(self, layer: Layer) -> int:
        if layer.weight is None:
            return 0
        return int(layer.mask.sum()) if layer.mask is not None else layer.weight.numel()

    @torch.no_grad()
    def after_step(self, layer: Layer, optimizer: torch.optim.Optimizer | None) -> None:
        layer.weight.mul_(layer.mask)
        for moment in _moments(optimizer, layer.weight):
            moment.mul_(layer.mask)

    @torch.no_grad()
    def remap(self, layer: Layer, kept: torch.Tensor, new: torch.Tensor,
              optimizer: torch.optim.Optimizer | None) -> None:
        # Removed and regrown links both restart from w = 0 with zero moments: multiplying by the
        # removal survivors (not the new mask) zeroes both, including a link removed and regrown at once.
        w = layer.weight
        w.mul_(kept)
        if w.grad is not None:
            w.grad.mul_(kept)
        for moment in _moments(optimizer, w):
            moment.mul_(kept)
        layer.mask.copy_(new)

    def check(self, name: str, entries: Mapping[str, torch.Tensor], out_features: int, in_features: int) -> None:
        pass  # any (out × in) mask is a support, and the header check has the shapes

    def to_csr(self, entries: Mapping[str, torch.Tensor], out_features: int, in_features: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The support is the mask, not the non-zeros of the weight: an active link whose value is
        # exactly 0 (e.g. just regrown) stays an explicit entry.
        mask = entries["mask"].to(torch.bool)
        crow, col = mask_to_csr(mask)
        return crow, col, entries["weight"][mask].contiguous()

    def from_csr(self, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out_features: int,
                 in_features: int) -> dict[str, torch.Tensor]:
        rows, cols = _rows(crow), col.long()
        mask = torch.zeros(out_features, in_features, dtype=torch.bool)
        mask[rows, cols] = True
        return {"weight": self.from_links(values, rows, cols, (out_features, in_features)), "mask": mask}

    def to_links(self, t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return t[rows, cols].contiguous()

    def from_links(self, links: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   shape: tuple[int, int]) -> torch.Tensor:
        return torch.zeros(shape, dtype=links.dtype, device=links.device).index_put_((rows, cols), links)


class CsrStorage(SparseStorage):
    """S = `values` (nnz,) over the support `crow_indices` int32 (out+1,), `col_indices` int16/int32
    (nnz,); forward and backward through `chtsl_infer.model.csr.csr_linear`, everything ∝ nnz. A csr
    layer has exactly `layer_link_count` links (each row group at its target), so its tensors' shapes
    follow from the config and `from_pretrained` can allocate them."""

    name, param, tensors, holds_dense = "csr", "values", ("values", "crow_indices", "col_indices"), False

    def build(self, layer: Layer, mask: torch.Tensor, nnz: int) -> None:
        self.install(layer, {"values": torch.empty(nnz),
                             "crow_indices": torch.zeros(layer.out_features + 1, dtype=torch.int32),
                             "col_indices": torch.zeros(nnz, dtype=col_index_dtype(layer.in_features))})
        if layer.values.device.type != "meta":  # from_pretrained builds on meta, then loads
            self.set_support(layer, *mask_to_csr(mask))

    def install(self, layer: Layer, entries: Mapping[str, torch.Tensor]) -> None:
        super().install(layer, entries)
        layer._csr_structure = None  # (key, CsrStructure) cache of `structure`

    def structure(self, layer: Layer) -> CsrStructure:
        """The `CsrStructure` of the layer's support, rebuilt (and validated) when the index buffers
        changed (replaced, written in place or moved) since it was last built.

        Raises ValueError when the buffers are not a valid CSR (non-monotone row pointers, a column
        out of range, a wrong length).
        """
        crow, col = layer.crow_indices, layer.col_indices
        key = (id(crow), crow._version, crow.data_ptr(), id(col), col._version, col.data_ptr(), crow.device)
        cached = layer._csr_structure
        if cached is None or cached[0] != key:
            if crow.numel() != layer.out_features + 1:
                raise ValueError(f"crow_indices has {crow.numel()} entries, expected out_features + 1 = "
                                 f"{layer.out_features + 1}")
            if col.numel() != layer.values.numel():
                raise ValueError(f"col_indices has {col.numel()} entries but values has {layer.values.numel()}")
            cached = layer._csr_structure = (key, CsrStructure.from_crow_col(crow, col, layer.in_features))
        return cached[1]

    @torch.no_grad()
    def set_support(self, layer: Layer, crow: torch.Tensor, col: torch.Tensor) -> None:
        """Replaces the layer's support (in place; same nnz), stored in the packed dtypes."""
        if col.numel() != layer.col_indices.numel():
            raise ValueError(f"a csr layer keeps its nnz ({layer.col_indices.numel()}), got {col.numel()} links")
        layer.crow_indices.copy_(crow.to(layer.crow_indices.device, torch.int32))
        layer.col_indices.copy_(col.to(layer.col_indices.device, layer.col_indices.dtype))
        layer._csr_structure = None

    def forward(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        return csr_linear(x, layer.values, self.structure(layer))

    def to_dense(self, layer: Layer, t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(layer.out_features, layer.in_features, dtype=t.dtype, device=t.device)
        return out.index_put(self.coordinates(layer), t)  # not in place: differentiable in t

    def from_dense(self, layer: Layer, dense: torch.Tensor) -> torch.Tensor:
        return dense[self.coordinates(layer)]

    def support(self, layer: Layer) -> torch.Tensor:
        return self.structure(layer).to_mask()

    def coordinates(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.structure(layer)
        return st.row_indices(), st.col.long()

    def n_links(self, layer: Layer) -> int:
        return layer.values.numel()

    def after_step(self, layer: Layer, optimizer: torch.optim.Optimizer | None) -> None:
        pass  # nothing is held off the support

    @torch.no_grad()
    def remap(self, layer: Layer, kept: torch.Tensor, new: torch.Tensor,
              optimizer: torch.optim.Optimizer | None) -> None:
        # Kept links move to their new CSR position (∝ nnz); the transient (out × in) tensors are
        # the caller's bool masks.
        nnz = layer.values.numel()
        rows_old, cols_old = self.coordinates(layer)
        keep_old = kept[rows_old, cols_old]  # (nnz,) bool: old links that survive
        crow, col = mask_to_csr(new)
        if col.numel() != nnz:
            raise RuntimeError(f"csr storage keeps nnz constant: the new support has {col.numel()} links, not {nnz}")
        n_in = layer.in_features
        new_keys = _rows(crow) * n_in + col.long()  # ascending (row-major order)
        src = keep_old.nonzero().squeeze(1)
        dest = torch.searchsorted(new_keys, rows_old[src] * n_in + cols_old[src])

        def move(t: torch.Tensor) -> None:
            moved = torch.zeros_like(t)
            moved[dest] = t[src]
            t.copy_(moved)

        move(layer.values.data)
        if layer.values.grad is not None:
            move(layer.values.grad)
        for moment in _moments(optimizer, layer.values):
            move(moment)
        self.set_support(layer, crow, col)

    def check(self, name: str, entries: Mapping[str, torch.Tensor], out_features: int, in_features: int) -> None:
        check_csr(name, entries["crow_indices"], entries.get("col_indices", torch.zeros(0)), entries.get("values"),
                  out_features, in_features)

    def to_csr(self, entries: Mapping[str, torch.Tensor], out_features: int, in_features: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return entries["crow_indices"], entries["col_indices"], entries["values"]

    def from_csr(self, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out_features: int,
                 in_features: int) -> dict[str, torch.Tensor]:
        return {"values": values.contiguous(), "crow_indices": crow.to(torch.int32).contiguous(),
                "col_indices": col.to(col_index_dtype(in_features)).contiguous()}

    def to_links(self, t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return t

    def from_links(self, links: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   shape: tuple[int, int]) -> torch.Tensor:
        return links.contiguous()


#: The registry: `--sparse-storage` / `config.chtsl["storage"]` name -> storage.
STORAGES: dict[str, SparseStorage] = {s.name: s for s in (MaskedStorage(), CsrStorage())}
#: Every storage's tensor names: installing one storage's tensors sets the others' to None.
TENSOR_NAMES: tuple[str, ...] = tuple(dict.fromkeys(k for s in STORAGES.values() for k in s.tensors))
DEFAULT_STORAGE = "masked"
CHOICES = ("auto", *STORAGES)
#: auto picks csr on CPU at or below this density of S (d_c = 1 − s) when the compiled kernels are
#: available: the paper's CHTsL density (s = 0.95), where benchmarks/train_step.py compares the
#: storages end to end (docs/performance.md §4); denser S is not measured, so masked.
AUTO_CSR_MAX_DENSITY = 0.05


def get_storage(name: str) -> SparseStorage:
    """The storage registered as `name`; ChtslError naming the valid ones."""
    try:
        return STORAGES[name]
    except (KeyError, TypeError):
        raise ChtslError(f"unknown sparse storage {name!r}; valid: {', '.join(STORAGES)}") from None


def check_storage(method: str | Method, storage: str) -> None:
    """ChtslError (one line) unless `storage` is valid for `method`: a storage holding only links
    (csr) needs a sparse branch."""
    s, m = get_storage(storage), get_method(method)
    if not s.holds_dense and not m.has_sparse:
        with_sparse = ", ".join(n for n, spec in METHODS.items() if spec.has_sparse)
        raise ChtslError(f"method {m.name!r} has no sparse branch: sparse storage {s.name!r} is for {with_sparse}")


def check_choice(requested: str, method: str) -> None:
    """ValueError (one line) for an unknown `--sparse-storage` or csr with a method lacking S."""
    if requested not in CHOICES:
        raise ValueError(f"unknown sparse storage {requested!r}; valid: {', '.join(CHOICES)}")
    if requested != "auto":
        check_storage(method, requested)


def resolve_storage(requested: str, method: str, device: str, density: float) -> tuple[str, str]:
    """(storage name, reason) for `--sparse-storage requested` of `method` on `device` at S density `density`.

    auto: csr on CPU when the compiled CSR kernels load and density ≤ `AUTO_CSR_MAX_DENSITY` (the
    density where the storages were compared); masked on CUDA (no GPU measurement yet says csr is faster
    there), without the compiled kernels (the torch fallback is slower than dense GEMM), or above the
    threshold. Methods without a sparse branch are always `masked` (nothing to store).
    """
    check_choice(requested, method)
    if not get_method(method).has_sparse:
        return "masked", f"method {method!r} has no sparse branch"
    if requested != "auto":
        return requested, "requested"
    if not device.startswith("cpu"):
        return "masked", f"auto: masked on {device} (csr not measured faster on GPUs yet)"
    if density > AUTO_CSR_MAX_DENSITY:
        return "masked", f"auto: density {density:.3f} > {AUTO_CSR_MAX_DENSITY} (csr measured slower above it)"
    from chtsl_infer.kernels import cpu_kernel_status

    ok, why = cpu_kernel_status()
    if not ok:
        return "masked", f"auto: no compiled CSR kernels ({why})"
    return "csr", f"auto: CPU with compiled kernels at density {density:.3f} <= {AUTO_CSR_MAX_DENSITY}"


# ----------------------------------------------------------------------------- validation


def check_csr(name: str, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor | None,
              out_features: int, in_features: int) -> None:
    """ValueError naming layer `name` unless (crow, col, values) is a valid CSR of an (out × in) S:
    `crow` (out+1,) from 0, non-decreasing, ending at nnz; `col` (nnz,) in [0, in), strictly
    ascending within each row; `values` (nnz,)."""
    if crow.dim() != 1 or crow.numel() != out_features + 1:
        raise ValueError(f"layer {name}: crow_indices has shape {tuple(crow.shape)}, expected ({out_features + 1},)")
    if col.dim() != 1:
        raise ValueError(f"layer {name}: col_indices must be 1-D, got shape {tuple(col.shape)}")
    if values is not None and values.shape != col.shape:
        raise ValueError(f"layer {name}: values has {values.numel()} entries, col_indices {col.numel()}")
    c = crow.long()
    if int(c[0]) != 0 or int(c[-1]) != col.numel():
        raise ValueError(f"layer {name}: row pointers run from {int(c[0])} to {int(c[-1])}, expected 0 to "
                         f"{col.numel()} (nnz)")
    if bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"layer {name}: row pointers (crow_indices) are not monotone")
    k = col.long()
    if k.numel() and (int(k.min()) < 0 or int(k.max()) >= in_features):
        raise ValueError(f"layer {name}: column index out of range [0, {in_features})")
    rows = _rows(c)
    if k.numel() > 1 and bool(((rows[1:] * in_features + k[1:]) <= (rows[:-1] * in_features + k[:-1])).any()):
        raise ValueError(f"layer {name}: columns are not strictly ascending within a row")


# ----------------------------------------------------------------------------- conversions


def _held_in(state: Mapping[str, torch.Tensor], prefix: str) -> SparseStorage | None:
    """The storage whose support `state` holds for the layer `prefix` (`<layer>.`), None if none."""
    return next((s for s in STORAGES.values() if prefix + s.support_buffers[0] in state), None)


def convert_state_dict(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state` (a model state dict of any storage) in the storage of `model`'s sparse layers.

    Every layer's S is validated first (`SparseStorage.check`: a CSR triple, ValueError naming the
    layer), then converted through its CSR triple when held in another storage than the layer's,
    e.g. `<layer>.weight`/`.mask` into `<layer>.values`/`.crow_indices`/`.col_indices` and back.
    ValueError when a converted tensor's shape is not the layer's (a csr layer's link count is fixed).
    """
    out = dict(state)
    for name, layer in model.sparse_layers().items():
        p = f"{name}."
        src, dst = _held_in(out, p), layer.storage
        if src is None:
            continue  # nothing to convert: a strict load names what is missing
        shape = (layer.out_features, layer.in_features)
        entries = {k: out[p + k] for k in src.tensors if p + k in out}
        src.check(name, entries, *shape)
        if src is dst:
            continue
        for k in src.tensors:
            out.pop(p + k, None)
        entries = dst.from_csr(*src.to_csr(entries, *shape), *shape)
        for k, t in entries.items():
            want = tuple(getattr(layer, k).shape)
            if tuple(t.shape) != want:
                raise ValueError(f"layer {name}: {src.name} storage gives {k} of shape {tuple(t.shape)}, the config's "
                                 f"{dst.name} layer has {want} (a {dst.name} layer keeps every group at its target)")
            out[p + k] = t
    return out


def convert_optimizer_state(
    tensors: Mapping[str, torch.Tensor], meta: dict[str, Any], model: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Adam state saved for any storage (`<param>.<key>` tensors + param-group names), re-laid out
    for `model`'s: e.g. `<layer>.weight.exp_avg` (out × in) ↔ `<layer>.values.exp_avg` (nnz,),
    through the links at the support `model` holds now (loaded from the same checkpoint)."""
    out = dict(tensors)
    rename: dict[str, str] = {}
    for name, layer in model.sparse_layers().items():
        dst = layer.storage
        new = f"{name}.{dst.param}"
        for src in STORAGES.values():
            old = f"{name}.{src.param}"
            keys = [k for k in out if k.startswith(old + ".") and "." not in k[len(old) + 1:]]
            if src is dst or not keys:
                continue
            rename[old] = new
            rows, cols = (c.cpu() for c in dst.coordinates(layer))
            for k in keys:
                t = out.pop(k)
                if t.dim():  # a moment (a 0-dim entry is Adam's step counter)
                    t = dst.from_links(src.to_links(t, rows, cols), rows, cols, (layer.out_features, layer.in_features))
                out[f"{new}.{k[len(old) + 1:]}"] = t
    meta = {**meta, "param_groups": [{**g, "params": [rename.get(n, n) for n in g["params"]]}
                                     for g in meta["param_groups"]]}
    return out, meta


@torch.no_grad()
def to_storage(model: torch.nn.Module, storage: str) -> torch.nn.Module:
    """Converts every sparse layer of `model` to `storage` in place (new parameters: build an
    optimizer afterwards); the model's config records it. For export and tools, not training."""
    dst = get_storage(storage)
    for layer in model.sparse_layers().values():
        if layer.storage is dst:
            continue
        check_storage(layer.method, storage)
        device = layer.storage.parameter(layer).device
        shape = (layer.out_features, layer.in_features)
        entries = dst.from_csr(*layer.storage.csr(layer), *shape)
        dst.install(layer, {k: t.to(device) for k, t in entries.items()})
    if model.sparse_layers():
        model.config.chtsl["storage"] = storage
    return model
