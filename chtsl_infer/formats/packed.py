"""The packed export format (docs/formats.md §2): CSR sparse branch + low-rank factors in one safetensors.

A training checkpoint stores each sparse `S` as a dense (out × in) weight plus a boolean mask.
The packed form keeps only the active links of every CHTsL linear as a CSR triple

    <name>.crow_indices  int32 (out+1,)   row pointers: row i holds entries crow[i]:crow[i+1]
    <name>.col_indices   int16 (nnz,)     column of each entry, sorted within its row
                                          (int32 when in_features > 32767)
    <name>.values        dtype (nnz,)     the weights, explicit zeros on the mask kept

plus `<name>.lora_A` (r, in) and `<name>.lora_B` (out, r); the `dense` method stores
`<name>.weight` (out, in). Every other tensor (embeddings, norms, lm_head) is stored under its
state-dict name. The safetensors header `__metadata__` holds `format=chtsl-packed`,
`format_version`, `activation`, `dtype` and `config` (the model config as JSON).

This module is the format's in-memory form, writer and validating reader. It imports nothing
from `train/` or `export/`, so the inference runtime can load exports on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chtsl_infer.errors import ChtslError, first_line
from chtsl_infer.formats.model_dir import PACKED_FORMAT as FORMAT
from chtsl_infer.formats.model_dir import WEIGHTS_NAME, packed_metadata
from chtsl_infer.model.configuration import ChtslConfig
from chtsl_infer.model.layers import SparseLowRankLinear
from chtsl_infer.model.modeling import ChtslLlamaForCausalLM
from chtsl_infer.utils import atomic_path

FORMAT_VERSION = "1"
INT16_MAX_COLUMNS = 32767  # int16 column indices address at most this many input features

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
LINEAR_SUFFIXES = ("crow_indices", "col_indices", "values", "lora_A", "lora_B", "weight")


def col_index_dtype(in_features: int) -> torch.dtype:
    """int16 column indices when they fit (in_features ≤ 32767), else int32."""
    return torch.int16 if in_features <= INT16_MAX_COLUMNS else torch.int32


@dataclass
class PackedLinear:
    """One CHTsL linear `y = S x + scale · B σ(A x)` in packed form (absent parts are None).

    crow_indices  int32 (out+1,)  CSR row pointers of S
    col_indices   int16/int32 (nnz,)  CSR columns, sorted within each row
    values        (nnz,)  the active weights of S
    lora_A (r, in), lora_B (out, r)  low-rank factors
    weight (out, in)  the full matrix, only for method `dense`
    """

    name: str
    in_features: int
    out_features: int
    crow_indices: torch.Tensor | None = None
    col_indices: torch.Tensor | None = None
    values: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    scale: float = 1.0
    activation: str = "identity"

    @property
    def has_sparse(self) -> bool:
        return self.crow_indices is not None

    @property
    def has_lowrank(self) -> bool:
        return self.lora_A is not None

    @property
    def nnz(self) -> int:
        return 0 if self.values is None else self.values.numel()

    def row_indices(self) -> torch.Tensor:
        """int64 (nnz,): the row of every CSR entry (expands the row pointers)."""
        assert self.crow_indices is not None
        counts = (self.crow_indices[1:] - self.crow_indices[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.out_features), counts)

    def dense_sparse_weight(self) -> torch.Tensor:
        """S as a dense (out, in) tensor in the values' dtype, zero outside the support."""
        assert self.col_indices is not None and self.values is not None
        w = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype)
        w[self.row_indices(), self.col_indices.long()] = self.values
        return w

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file entries of this linear, `<name>.<part>` -> tensor (present parts only)."""
        return {
            f"{self.name}.{part}": getattr(self, part)
            for part in LINEAR_SUFFIXES
            if getattr(self, part) is not None
        }

    def nbytes(self) -> int:
        """Bytes of this linear's tensors (CSR triple + factors, or the dense weight)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@dataclass
class PackedModel:
    """A whole model in packed form: config, CHTsL linears by module name, and the dense rest."""

    config: ChtslConfig
    dtype: torch.dtype
    linears: dict[str, PackedLinear]
    dense: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every file entry: the linears' parts and the dense tensors by state-dict name."""
        out: dict[str, torch.Tensor] = {}
        for lin in self.linears.values():
            out.update(lin.tensors())
        out.update(self.dense)
        return out


# ----------------------------------------------------------------------------- packing


def _tied_keys(config: ChtslConfig) -> set[str]:
    """State-dict keys that alias another tensor (never stored: safetensors refuses shared memory)."""
    return {"lm_head.weight"} if config.tie_word_embeddings else set()


@torch.no_grad()
def pack_linear(name: str, layer: SparseLowRankLinear, dtype: torch.dtype = torch.float32) -> PackedLinear:
    """The packed form of one training-form layer: CSR of S (either storage), factors cast to `dtype`."""
    packed = PackedLinear(
        name=name,
        in_features=layer.in_features,
        out_features=layer.out_features,
        scale=float(layer.scale),
        activation=layer.activation,
    )
    if layer.has_sparse:  # row-major; every link of the support, explicit zeros (e.g. just regrown) kept
        crow, col, values = layer.storage.csr(layer)
        packed.crow_indices = crow.to(torch.int32).contiguous()
        packed.col_indices = col.to(col_index_dtype(layer.in_features)).contiguous()
        packed.values = values.to(dtype).contiguous()
    elif layer.weight is not None:  # method `dense`: a plain Linear
        packed.weight = layer.weight.detach().cpu().to(dtype).contiguous()
    if layer.has_lowrank:
        packed.lora_A = layer.lora_A.detach().cpu().to(dtype).contiguous()
        packed.lora_B = layer.lora_B.detach().cpu().to(dtype).contiguous()
    return packed


@torch.no_grad()
def pack_model(model: ChtslLlamaForCausalLM, dtype: torch.dtype = torch.float32) -> PackedModel:
    """The packed form of a training-form model, in memory; float tensors cast to `dtype`."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype}; valid: {', '.join(DTYPES)}")
    config: ChtslConfig = model.config
    linears = {name: pack_linear(name, layer, dtype) for name, layer in model.chtsl_layers().items()}
    skip = _tied_keys(config)
    dense: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in linears or key in skip:
            continue
        t = tensor.detach().cpu()
        dense[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return PackedModel(config=config, dtype=dtype, linears=linears, dense=dense, metadata=_metadata(config, dtype))


def _metadata(config: ChtslConfig, dtype: torch.dtype) -> dict[str, str]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "activation": config.chtsl["activation"],
        "dtype": DTYPE_NAMES[dtype],
        "config": config.to_json_string(use_diff=False),
    }


def save_packed(packed: PackedModel, path: str | Path) -> None:
    """Writes `packed` to the safetensors file `path` atomically (temp file + rename)."""
    from safetensors.torch import save_file

    target = Path(path)
    metadata = {**packed.metadata, **_metadata(packed.config, packed.dtype)}
    with atomic_path(target) as tmp:
        save_file(packed.tensors(), tmp, metadata=metadata)


# ----------------------------------------------------------------------------- loading


def _expected_layout(config: ChtslConfig) -> tuple[dict[str, SparseLowRankLinear], dict[str, torch.Size]]:
    """(CHTsL layers by name, dense tensor shapes by key) of a model of `config`, built on `meta`
    (no memory, no init cost), so a file can be checked against its config."""
    with torch.device("meta"):
        model = ChtslLlamaForCausalLM(config)
    layers = model.chtsl_layers()
    skip = _tied_keys(config)
    dense = {
        key: t.shape
        for key, t in model.state_dict().items()
        if key.rsplit(".", 1)[0] not in layers and key not in skip
    }
    return layers, dense


def _read_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; ChtslError when it is missing, corrupt or truncated."""
    from safetensors import safe_open

    if not path.is_file():
        raise ChtslError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except Exception as e:  # safetensors raises SafetensorError/OSError/RuntimeError for bad bytes
        raise ChtslError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    return metadata, tensors


def _check_csr(path: Path, lin: PackedLinear, values_dtype: torch.dtype) -> None:
    """Validates one CSR triple; ChtslError naming the file, the layer and the problem."""
    where = f"{path}: {lin.name}"
    crow, col, vals = lin.crow_indices, lin.col_indices, lin.values
    assert crow is not None and col is not None and vals is not None
    if crow.dtype != torch.int32 or crow.shape != (lin.out_features + 1,):
        raise ChtslError(f"{where}.crow_indices must be int32 of shape ({lin.out_features + 1},), "
                        f"got {crow.dtype} {tuple(crow.shape)}")
    want_col = col_index_dtype(lin.in_features)
    if col.dtype != want_col or col.dim() != 1:
        raise ChtslError(f"{where}.col_indices must be a 1-D {want_col} tensor, got {col.dtype} {tuple(col.shape)}")
    if vals.dtype != values_dtype or vals.shape != col.shape:
        raise ChtslError(f"{where}.values must be {values_dtype} of shape {tuple(col.shape)}, "
                        f"got {vals.dtype} {tuple(vals.shape)}")
    crow64 = crow.long()
    if crow64[0] != 0 or crow64[-1] != col.numel():
        raise ChtslError(f"{where}.crow_indices must start at 0 and end at nnz={col.numel()}, "
                        f"got {int(crow64[0])}..{int(crow64[-1])}")
    if bool((crow64[1:] < crow64[:-1]).any()):
        raise ChtslError(f"{where}.crow_indices are not monotone")
    col64 = col.long()
    if col64.numel() and (int(col64.min()) < 0 or int(col64.max()) >= lin.in_features):
        raise ChtslError(f"{where}.col_indices out of range [0, {lin.in_features}): "
                        f"min {int(col64.min())}, max {int(col64.max())}")
    rows = lin.row_indices()
    same_row = rows[1:] == rows[:-1]
    if bool((same_row & (col64[1:] <= col64[:-1])).any()):
        raise ChtslError(f"{where}.col_indices are not strictly increasing within a row")


def _check_shape(path: Path, key: str, tensor: torch.Tensor, shape: tuple[int, ...] | torch.Size,
                 dtype: torch.dtype) -> None:
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        raise ChtslError(f"{path}: {key} should be {dtype} {tuple(shape)}, got {tensor.dtype} {tuple(tensor.shape)}")


def load_packed(path: str | Path) -> PackedModel:
    """Reads and validates a packed safetensors file (or a directory holding `model.safetensors`).

    Checks the header (format, version, dtype, config), every expected tensor's presence, dtype
    and shape against the config, and every CSR triple (row pointers monotone from 0 to nnz,
    columns in range and strictly increasing within rows). Any violation → ChtslError naming the
    file and the problem; unexpected extra tensors are errors too.
    """
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_NAME
    metadata, tensors = _read_file(p)
    if metadata.get("format") != FORMAT:
        raise ChtslError(f"{p}: not a chtsl packed export (metadata format {metadata.get('format')!r}, "
                        f"expected {FORMAT!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ChtslError(f"{p}: unsupported format_version {metadata.get('format_version')!r} "
                        f"(this chtsl reads {FORMAT_VERSION!r})")
    dtype = DTYPES.get(metadata.get("dtype", ""))
    if dtype is None:
        raise ChtslError(f"{p}: unknown dtype {metadata.get('dtype')!r} in metadata; valid: {', '.join(DTYPES)}")
    from chtsl_infer.formats.checkpoint import check_finite, config_from_dict

    try:
        raw = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError, TypeError) as e:
        raise ChtslError(f"{p}: invalid config in metadata ({first_line(e)})") from None
    config = config_from_dict(raw, f"{p}: the config in its metadata")
    check_finite(tensors, p)

    layers, dense_shapes = _expected_layout(config)
    remaining = dict(tensors)

    def take(key: str) -> torch.Tensor:
        if key not in remaining:
            raise ChtslError(f"{p}: missing tensor {key}")
        return remaining.pop(key)

    linears: dict[str, PackedLinear] = {}
    for name, layer in layers.items():
        lin = PackedLinear(name=name, in_features=layer.in_features, out_features=layer.out_features,
                           scale=float(layer.scale), activation=layer.activation)
        if layer.has_sparse:
            lin.crow_indices = take(f"{name}.crow_indices")
            lin.col_indices = take(f"{name}.col_indices")
            lin.values = take(f"{name}.values")
            _check_csr(p, lin, dtype)
        elif layer.weight is not None:
            lin.weight = take(f"{name}.weight")
            _check_shape(p, f"{name}.weight", lin.weight, (layer.out_features, layer.in_features), dtype)
        if layer.has_lowrank:
            lin.lora_A = take(f"{name}.lora_A")
            lin.lora_B = take(f"{name}.lora_B")
            _check_shape(p, f"{name}.lora_A", lin.lora_A, (layer.rank, layer.in_features), dtype)
            _check_shape(p, f"{name}.lora_B", lin.lora_B, (layer.out_features, layer.rank), dtype)
        linears[name] = lin

    dense: dict[str, torch.Tensor] = {}
    for key, shape in dense_shapes.items():
        tensor = take(key)
        _check_shape(p, key, tensor, shape, dtype if tensor.is_floating_point() else tensor.dtype)
        dense[key] = tensor
    if remaining:
        raise ChtslError(f"{p}: unexpected tensor {sorted(remaining)[0]} (and {len(remaining) - 1} more)"
                        if len(remaining) > 1 else f"{p}: unexpected tensor {next(iter(remaining))}")
    return PackedModel(config=config, dtype=dtype, linears=linears, dense=dense, metadata=dict(metadata))


@torch.no_grad()
def unpack_model(packed: PackedModel, dtype: torch.dtype | None = None) -> ChtslLlamaForCausalLM:
    """The training-form model of `packed`, S in the storage its config names (masked: weight = S
    densified, mask = CSR pattern; csr: the CSR triple itself), in eval mode.

    `dtype`: parameters' dtype, default the packed dtype (pass torch.float32 to compute in fp32).
    The global RNG is left untouched (building the model draws random masks, then overwritten).
    """
    dtype = dtype or packed.dtype
    with torch.random.fork_rng(devices=[]):
        model = ChtslLlamaForCausalLM(packed.config)
    state: dict[str, torch.Tensor] = dict(packed.dense)
    layers = model.chtsl_layers()
    for name, lin in packed.linears.items():
        if lin.has_sparse:
            entries = layers[name].storage.from_csr(lin.crow_indices, lin.col_indices, lin.values,
                                                    lin.out_features, lin.in_features)
            state.update({f"{name}.{k}": t for k, t in entries.items()})
        elif lin.weight is not None:
            state[f"{name}.weight"] = lin.weight
        if lin.has_lowrank:
            state[f"{name}.lora_A"] = lin.lora_A
            state[f"{name}.lora_B"] = lin.lora_B
    model = model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(packed.config)]
    if missing or unexpected:
        raise ChtslError(f"packed model does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if packed.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def is_packed_dir(path: str | Path) -> bool:
    """True when `path` is a directory whose `model.safetensors` header says `format=chtsl-packed`."""
    return packed_metadata(Path(path) / WEIGHTS_NAME) is not None


def load_packed_model(path: str | Path, dtype: torch.dtype | None = torch.float32) -> ChtslLlamaForCausalLM:
    """`unpack_model(load_packed(path))` in `dtype` (fp32 by default, None = the packed dtype)."""
    return unpack_model(load_packed(path), dtype)
