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

This module is the format's in-memory form: packing a training-form model and unpacking it again.
Writing and reading the file (its header, validation) is `formats/model_dir.py`; this module does
no file I/O and imports nothing from `train/` or `export/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chtsl_infer.errors import ChtslError
from chtsl_infer.model.configuration import ChtslConfig
from chtsl_infer.model.layers import SparseLowRankLinear
from chtsl_infer.model.modeling import ChtslLlamaForCausalLM
from chtsl_infer.model.storage import get_storage

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
    metadata: dict[str, str] = field(default_factory=dict)  # a read file's header (`model_dir.load_packed`)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every file entry: the linears' parts and the dense tensors by state-dict name."""
        out: dict[str, torch.Tensor] = {}
        for lin in self.linears.values():
            out.update(lin.tensors())
        out.update(self.dense)
        return out


# ----------------------------------------------------------------------------- packing


def tied_keys(config: ChtslConfig) -> set[str]:
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
    skip = tied_keys(config)
    dense: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in linears or key in skip:
            continue
        t = tensor.detach().cpu()
        dense[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return PackedModel(config=config, dtype=dtype, linears=linears, dense=dense)


# ----------------------------------------------------------------------------- unpacking


def training_state_dict(packed: PackedModel) -> dict[str, torch.Tensor]:
    """The training-form state dict of `packed` (tied keys absent): S in the storage its config names
    (masked: weight = S densified, mask = CSR pattern; csr: the CSR triple itself), A, B, the dense rest."""
    storage = get_storage(packed.config.chtsl["storage"])
    state: dict[str, torch.Tensor] = dict(packed.dense)
    for name, lin in packed.linears.items():
        if lin.has_sparse:
            entries = storage.from_csr(lin.crow_indices, lin.col_indices, lin.values, lin.out_features,
                                       lin.in_features)
            state.update({f"{name}.{k}": t for k, t in entries.items()})
        elif lin.weight is not None:
            state[f"{name}.weight"] = lin.weight
        if lin.has_lowrank:
            state[f"{name}.lora_A"] = lin.lora_A
            state[f"{name}.lora_B"] = lin.lora_B
    return state


@torch.no_grad()
def unpack_model(packed: PackedModel, dtype: torch.dtype | None = None) -> ChtslLlamaForCausalLM:
    """The training-form model of `packed` (`training_state_dict`), in eval mode.

    `dtype`: parameters' dtype, default the packed dtype (pass torch.float32 to compute in fp32).
    The global RNG is left untouched (building the model draws random masks, then overwritten).
    """
    dtype = dtype or packed.dtype
    with torch.random.fork_rng(devices=[]):
        model = ChtslLlamaForCausalLM(packed.config)
    model = model.to(dtype)
    missing, unexpected = model.load_state_dict(training_state_dict(packed), strict=False)
    missing = [k for k in missing if k not in tied_keys(packed.config)]
    if missing or unexpected:
        raise ChtslError(f"packed model does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if packed.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
