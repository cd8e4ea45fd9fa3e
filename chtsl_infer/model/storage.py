"""How sparse layers hold S in training (`masked` or `csr`), choosing one (`auto`), and moving model
and optimizer state between the two.

- `masked`: dense weight (out × in) × bool mask. Weight, gradient and both Adam moments are dense.
- `csr`: values (nnz,) over a CSR support (`crow_indices`, `col_indices`, the packed layout of
  docs/formats.md §2); gradient and Adam moments are (nnz,) too.

`resolve_storage` turns `--sparse-storage auto|masked|csr` into one of the two, with the reason
printed and logged by `chtsl train`. The converters let a checkpoint written in one storage resume
in the other: model state (`convert_state_dict`) and optimizer moments (`convert_optimizer_state`)
are re-laid out through the support, which both storages hold exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from chtsl_infer.model.layers import SparseLowRankLinear, mask_to_csr
from chtsl_infer.model.methods import STORAGES, check_storage, get_method

CHOICES = ("auto", *STORAGES)
#: auto picks csr on CPU at or below this density of S (d_c = 1 − s) when the compiled kernels are
#: available: the paper's CHTsL density (s = 0.95), where benchmarks/train_step.py compares the
#: storages end to end (README, "Sparse storage in training"); denser S is not measured, so masked.
AUTO_CSR_MAX_DENSITY = 0.05


def check_choice(requested: str, method: str) -> None:
    """ValueError (one line) for an unknown `--sparse-storage` or csr with a method lacking S."""
    if requested not in CHOICES:
        raise ValueError(f"unknown sparse storage {requested!r}; valid: {', '.join(CHOICES)}")
    if requested != "auto":
        check_storage(method, requested)


def resolve_storage(requested: str, method: str, device: str, density: float) -> tuple[str, str]:
    """(storage, reason) for `--sparse-storage requested` of `method` on `device` at S density `density`.

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
    rows = torch.repeat_interleave(torch.arange(out_features), c[1:] - c[:-1])
    if k.numel() > 1 and bool(((rows[1:] * in_features + k[1:]) <= (rows[:-1] * in_features + k[:-1])).any()):
        raise ValueError(f"layer {name}: columns are not strictly ascending within a row")


def check_model_csr(model: torch.nn.Module) -> None:
    """ValueError naming the first csr layer of `model` whose support is not a valid CSR."""
    for name, layer in model.chtsl_layers().items():
        if layer.storage == "csr":
            check_csr(name, layer.crow_indices, layer.col_indices, layer.values, layer.out_features,
                      layer.in_features)


# ----------------------------------------------------------------------------- conversions


def _to_csr(weight: torch.Tensor, mask: torch.Tensor, in_features: int) -> dict[str, torch.Tensor]:
    mask = mask.to(torch.bool)
    crow, col = mask_to_csr(mask)
    return {"crow_indices": crow, "col_indices": col, "values": weight[mask].contiguous()}


def _to_masked(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out_features: int,
               in_features: int) -> dict[str, torch.Tensor]:
    rows = torch.repeat_interleave(torch.arange(out_features), (crow[1:] - crow[:-1]).long())
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    mask[rows, col.long()] = True
    weight = torch.zeros(out_features, in_features, dtype=values.dtype)
    weight[rows, col.long()] = values
    return {"weight": weight, "mask": mask}


def convert_state_dict(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state` (a model state dict of either storage) in the storage of `model`'s sparse layers.

    Every CSR triple in `state` is validated first (ValueError naming the layer). Masked entries
    `<layer>.weight`/`.mask` become `<layer>.crow_indices`/`.col_indices`/`.values` for a csr layer
    and back. The CSR order is row-major, so the values' order is that of `mask.nonzero()`.
    """
    out = dict(state)
    for name, layer in model.chtsl_layers().items():
        if not layer.has_sparse:
            continue
        p = f"{name}."
        if f"{p}crow_indices" in out:
            check_csr(name, out[f"{p}crow_indices"], out.get(f"{p}col_indices", torch.zeros(0)),
                      out.get(f"{p}values"), layer.out_features, layer.in_features)
            if layer.storage == "csr" and out[f"{p}col_indices"].numel() != layer.values.numel():
                raise ValueError(f"layer {name}: {out[f'{p}col_indices'].numel()} links, the config's csr layer "
                                 f"has {layer.values.numel()}")
            if layer.storage != "csr":
                parts = _to_masked(out.pop(f"{p}crow_indices"), out.pop(f"{p}col_indices"), out.pop(f"{p}values"),
                                   layer.out_features, layer.in_features)
                out.update({p + k: v for k, v in parts.items()})
        elif f"{p}mask" in out and layer.storage == "csr":
            parts = _to_csr(out.pop(f"{p}weight"), out.pop(f"{p}mask"), layer.in_features)
            if parts["values"].numel() != layer.values.numel():
                raise ValueError(f"layer {name}: the mask has {parts['values'].numel()} links, csr storage needs "
                                 f"{layer.values.numel()} (every group at its target)")
            parts["col_indices"] = parts["col_indices"].to(layer.col_index_dtype())
            out.update({p + k: v for k, v in parts.items()})
    return out


def convert_optimizer_state(
    tensors: Mapping[str, torch.Tensor], meta: dict[str, Any], model: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Adam state saved for one storage (`<param>.<key>` tensors + param-group names), re-laid out
    for `model`'s storage: `<layer>.weight.exp_avg` (out × in) ↔ `<layer>.values.exp_avg` (nnz,),
    gathered at / scattered onto the support `model` holds now (loaded from the same checkpoint)."""
    out = dict(tensors)
    rename: dict[str, str] = {}
    for name, layer in model.chtsl_layers().items():
        if not layer.has_sparse:
            continue
        w, v = f"{name}.weight", f"{name}.values"
        src, dst = (w, v) if layer.storage == "csr" else (v, w)
        keys = [k for k in out if k.startswith(src + ".") and "." not in k[len(src) + 1:]]
        if not keys:
            continue
        rename[src] = dst
        mask = layer.support_mask().cpu()
        for k in keys:
            t = out.pop(k)
            key = k[len(src) + 1:]
            if t.dim() == 0:  # Adam's step counter
                out[f"{dst}.{key}"] = t
            elif layer.storage == "csr":
                out[f"{dst}.{key}"] = t[mask].contiguous()
            else:
                full = torch.zeros(mask.shape, dtype=t.dtype)
                full[mask] = t
                out[f"{dst}.{key}"] = full
    meta = {**meta, "param_groups": [{**g, "params": [rename.get(n, n) for n in g["params"]]}
                                     for g in meta["param_groups"]]}
    return out, meta


@torch.no_grad()
def to_storage(model: torch.nn.Module, storage: str) -> torch.nn.Module:
    """Converts every sparse layer of `model` to `storage` in place (new parameters: build an
    optimizer afterwards); the model's config records it. For export and tools, not training."""
    for name, layer in model.chtsl_layers().items():
        if not layer.has_sparse or layer.storage == storage:
            continue
        check_storage(layer.method, storage)
        _convert_layer(name, layer, storage)
    if model.sparse_layers():
        model.config.chtsl["storage"] = storage
    return model


def _convert_layer(name: str, layer: SparseLowRankLinear, storage: str) -> None:
    """Swaps one layer's S tensors between the storages, keeping its values on the same support."""
    device = (layer.values if layer.storage == "csr" else layer.weight).device
    if storage == "csr":
        parts = _to_csr(layer.weight.detach().cpu(), layer.mask.cpu(), layer.in_features)
        parts["col_indices"] = parts["col_indices"].to(layer.col_index_dtype())
        params, buffers, dropped = ("values",), ("crow_indices", "col_indices"), ("weight", "mask")
    else:
        parts = _to_masked(layer.crow_indices.cpu(), layer.col_indices.cpu(), layer.values.detach().cpu(),
                           layer.out_features, layer.in_features)
        params, buffers, dropped = ("weight",), ("mask",), ("values", "crow_indices", "col_indices")
    for attr in (*params, *buffers, *dropped):  # parameters, buffers and plain None attributes alike
        layer._parameters.pop(attr, None)
        layer._buffers.pop(attr, None)
        layer.__dict__.pop(attr, None)
    for attr in params:
        layer.register_parameter(attr, torch.nn.Parameter(parts[attr].to(device)))
    for attr in buffers:
        layer.register_buffer(attr, parts[attr].to(device))
    for attr in dropped:
        setattr(layer, attr, None)
    layer.storage = storage
    layer._structure = None
