"""The packed export format (docs/formats.md §2): CSR sparse branch + low-rank factors in one safetensors.

A training checkpoint stores each sparse `S` as a dense (out × in) weight plus a boolean mask.
The packed form keeps only the active links of every CHTsL linear as a CSR triple

    <name>.crow_indices  int32 (out+1,)   row pointers: row i holds entries crow[i]:crow[i+1]
    <name>.col_indices   int16 (nnz,)     column of each entry, sorted within its row
                                          (int32 when in_features > 32767); or
    <name>.col_delta     uint8 (nnz,)     8-bit column deltas within each row (format 2)
    <name>.values        dtype (nnz,)     the weights, explicit zeros on the mask kept

plus `<name>.lora_A` (r, in) and `<name>.lora_B` (out, r); the `dense` method stores
`<name>.weight` (out, in); with int8 values each of these has `<name>.<part>_scale`, fp32 per
row (formats/encoding.py). Every other tensor (embeddings, norms, lm_head) is stored under its
state-dict name. The safetensors header `__metadata__` holds `format=chtsl-packed`,
`format_version`, `activation`, `dtype`, `float_dtype`, `index` and `config` (the model config as JSON).

This module is the format's in-memory form: packing a training-form model and unpacking it again.
Writing and reading the file (its header, validation) is `formats/model_dir.py`; this module does
no file I/O and imports nothing from `train/` or `export/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chtsl_infer.errors import ChtslError
from chtsl_infer.formats.encoding import (
    delta_decode,
    delta_encode,
    dequantize_csr,
    dequantize_rows,
    quantize_csr,
    quantize_rows,
    row_of_links,
)
from chtsl_infer.kernels.sparse import absolute_columns
from chtsl_infer.model import budget
from chtsl_infer.model.configuration import ChtslConfig
from chtsl_infer.model.layers import SparseLowRankLinear
from chtsl_infer.model.modeling import ChtslLlamaForCausalLM
from chtsl_infer.model.storage import get_storage

INT16_MAX_COLUMNS = 32767  # int16 column indices address at most this many input features

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                                   "int8": torch.int8}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # what the tensors that stay float (embeddings, norms) take
INDEX_ENCODINGS = ("absolute", "delta8")  # col_indices int16/int32, or col_delta uint8 (docs/formats.md §2)
#: A linear's parts, each followed by its int8 row scales where it has them (`<part>_scale`).
LINEAR_SUFFIXES = ("crow_indices", "col_indices", "values", "values_scale", "lora_A", "lora_A_scale", "lora_B",
                   "lora_B_scale", "weight", "weight_scale")
QUANTIZED_PARTS = ("values", "lora_A", "lora_B", "weight")  # int8 with a `_scale` in an int8 model


def col_index_dtype(in_features: int) -> torch.dtype:
    """int16 column indices when they fit (in_features ≤ 32767), else int32."""
    return torch.int16 if in_features <= INT16_MAX_COLUMNS else torch.int32


def default_index(dtype: torch.dtype) -> str:
    """The index encoding an export of value dtype `dtype` uses unless told: 8-bit deltas for bf16 and int8
    (where they cut the bytes per link by a third and a quarter), absolute columns for fp32 and fp16."""
    return "delta8" if dtype in (torch.bfloat16, torch.int8) else "absolute"


def default_float_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the tensors that stay float (embeddings, norms) in an export of value dtype `dtype`:
    bf16 for int8 (the embedding is a tenth of a 1B int8 model in bf16, a fifth in fp32), else `dtype`."""
    return torch.bfloat16 if dtype == torch.int8 else dtype


@dataclass
class PackedLinear:
    """One CHTsL linear `y = S x + scale · B σ(A x)` in packed form (absent parts are None).

    crow_indices  int32 (out+1,)  CSR row pointers of S
    col_indices   (nnz,)  CSR columns, int16/int32, sorted within each row; or uint8 column deltas
                  (docs/formats.md §2: then nnz counts the padding links, and the file calls it col_delta)
    values        (nnz,)  the active weights of S
    lora_A (r, in), lora_B (out, r)  low-rank factors
    weight (out, in)  the full matrix, only for method `dense`
    *_scale       fp32, one per row of `values` (S's rows), lora_A, lora_B, weight: where they are int8
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
    values_scale: torch.Tensor | None = None
    lora_A_scale: torch.Tensor | None = None
    lora_B_scale: torch.Tensor | None = None
    weight_scale: torch.Tensor | None = None

    @property
    def has_sparse(self) -> bool:
        return self.crow_indices is not None

    @property
    def has_lowrank(self) -> bool:
        return self.lora_A is not None

    @property
    def nnz(self) -> int:
        """Stored links of S (with column deltas, the padding links included)."""
        return 0 if self.values is None else self.values.numel()

    def row_indices(self) -> torch.Tensor:
        """int64 (nnz,): the row of every CSR entry (expands the row pointers)."""
        assert self.crow_indices is not None
        return row_of_links(self.crow_indices)

    def part(self, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """Part `name` (values, lora_A, lora_B, weight) in float `dtype`, int8 parts dequantized."""
        t = getattr(self, name)
        if t is None or t.dtype != torch.int8:
            return None if t is None else t.to(dtype)
        q_scale = getattr(self, f"{name}_scale")
        return dequantize_csr(self.crow_indices, t, q_scale, dtype) if name == "values" else \
            dequantize_rows(t, q_scale, dtype)

    def dense_sparse_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """S as a dense (out, in) tensor in `dtype` (default: the values' float dtype; int8 dequantized),
        zero outside the support."""
        assert self.crow_indices is not None and self.col_indices is not None and self.values is not None
        dtype = dtype or (torch.float32 if self.values.dtype == torch.int8 else self.values.dtype)
        w = torch.zeros(self.out_features, self.in_features, dtype=dtype)
        # index_put_ with accumulate: the padding links of column deltas add their zeros
        w.index_put_((self.row_indices(), absolute_columns(self.crow_indices, self.col_indices)),
                     self.part("values", dtype), accumulate=True)
        return w

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file entries of this linear, `<name>.<part>` -> tensor (present parts only); uint8 column
        deltas are `<name>.col_delta`."""
        out = {}
        for part in LINEAR_SUFFIXES:
            t = getattr(self, part)
            if t is not None:
                key = "col_delta" if part == "col_indices" and t.dtype == torch.uint8 else part
                out[f"{self.name}.{key}"] = t
        return out

    def nbytes(self) -> int:
        """Bytes of this linear's tensors (CSR triple + factors, or the dense weight, and int8 scales)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@dataclass
class PackedModel:
    """A whole model in packed form: config, CHTsL linears by module name, and the dense rest.

    dtype: the value dtype (S, the factors, a dense weight, the lm_head); float_dtype: the other float
    tensors' (embeddings, norms; None: `dtype`); index: the column encoding, absolute or delta8. With
    int8 values an untied lm_head is `dense["lm_head.weight"]` int8 with `dense["lm_head.weight_scale"]`."""

    config: ChtslConfig
    dtype: torch.dtype
    linears: dict[str, PackedLinear]
    dense: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)  # a read file's header (`model_dir.load_packed`)
    float_dtype: torch.dtype | None = None
    index: str = "absolute"

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every file entry: the linears' parts and the dense tensors by state-dict name."""
        out: dict[str, torch.Tensor] = {}
        for lin in self.linears.values():
            out.update(lin.tensors())
        out.update(self.dense)
        return out

    def decode_bytes(self) -> dict[str, float]:
        """What decoding one token reads, in bytes (docs/formats.md §2), from the tensors: "linears" (every
        block linear's tensors), "lm_head" (the embedding when tied), "norms" and "embedding" (one row),
        "total", and "per_link" (the bytes of S — values, columns, row pointers, scales — per stored link)."""
        sparse = [lin for lin in self.linears.values() if lin.has_sparse]
        s_bytes = sum(sum(t.nbytes for t in (lin.crow_indices, lin.col_indices, lin.values, lin.values_scale)
                          if t is not None) for lin in sparse)
        links = sum(lin.nnz for lin in sparse)
        embed = self.dense["model.embed_tokens.weight"]
        head = [t for k, t in self.dense.items() if k.startswith("lm_head.")] or [embed]
        parts = {"linears": float(sum(lin.nbytes() for lin in self.linears.values())),
                 "lm_head": float(sum(t.nbytes for t in head)),
                 "norms": float(sum(t.nbytes for k, t in self.dense.items() if k.endswith("norm.weight"))),
                 "embedding": float(embed.nbytes / embed.shape[0])}
        return {**parts, "total": sum(parts.values()), "per_link": s_bytes / links if links else float("nan")}


# ----------------------------------------------------------------------------- packing


def tied_keys(config: ChtslConfig) -> set[str]:
    """State-dict keys that alias another tensor (never stored: safetensors refuses shared memory)."""
    return {"lm_head.weight"} if config.tie_word_embeddings else set()


def _store(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A dense (rows, cols) part in the value dtype: (tensor, None), or int8 (q, row scales)."""
    t = t.detach().cpu()
    if dtype == torch.int8:
        return quantize_rows(t)
    return t.to(dtype).contiguous(), None


def _encode_linear(lin: PackedLinear, dtype: torch.dtype, index: str) -> PackedLinear:
    """`lin` (any dtype and column encoding) with value dtype `dtype` (int8: quantized per row) and column
    encoding `index`. Float parts are read in fp32 (int8 ones dequantized), so re-encoding an int8
    model quantizes its dequantized weights again (the same rows and scales)."""
    out = PackedLinear(name=lin.name, in_features=lin.in_features, out_features=lin.out_features,
                       scale=lin.scale, activation=lin.activation)
    if lin.has_sparse:  # row-major; every link of the support, explicit zeros (e.g. just regrown) kept
        crow, col, values = lin.crow_indices.to(torch.int32), lin.col_indices, lin.part("values", torch.float32)
        if col.dtype == torch.uint8 and index == "absolute":
            crow, col, values = delta_decode(crow, col, values, col_index_dtype(lin.in_features))
        elif col.dtype != torch.uint8 and index == "delta8":
            crow, col, values = delta_encode(crow, col, values)
        elif col.dtype != torch.uint8:
            col = col.to(col_index_dtype(lin.in_features))
        if dtype == torch.int8:  # padding links are zeros: they leave the rows' scales alone
            values, out.values_scale = quantize_csr(crow, values)
        else:
            values = values.to(dtype)
        out.crow_indices, out.col_indices, out.values = crow.contiguous(), col.contiguous(), values.contiguous()
    for part in ("weight", "lora_A", "lora_B"):
        t = lin.part(part, torch.float32)
        if t is not None:
            q, q_scale = _store(t, dtype)
            setattr(out, part, q)
            setattr(out, f"{part}_scale", q_scale)
    return out


@torch.no_grad()
def pack_linear(name: str, layer: SparseLowRankLinear, dtype: torch.dtype = torch.float32,
                index: str = "absolute") -> PackedLinear:
    """The packed form of one training-form layer: CSR of S (either storage), factors in `dtype` (int8: with
    per-row scales, docs/formats.md §2); `index` "absolute" (int16/int32 columns) or "delta8"."""
    lin = PackedLinear(name=name, in_features=layer.in_features, out_features=layer.out_features,
                       scale=float(layer.scale), activation=layer.activation)
    if layer.has_sparse:
        crow, col, values = layer.storage.csr(layer)
        lin.crow_indices, lin.col_indices, lin.values = crow, col, values.detach().cpu().float()
    elif layer.weight is not None:  # method `dense`: a plain Linear
        lin.weight = layer.weight.detach().cpu().float()
    if layer.has_lowrank:
        lin.lora_A, lin.lora_B = layer.lora_A.detach().cpu().float(), layer.lora_B.detach().cpu().float()
    return _encode_linear(lin, dtype, index)


def _encode_dense(dense: dict[str, torch.Tensor], dtype: torch.dtype, float_dtype: torch.dtype
                  ) -> dict[str, torch.Tensor]:
    """The non-linear tensors: an untied lm_head in the value dtype (int8: with `lm_head.weight_scale`), the
    other float ones in `float_dtype`, integer ones as they are."""
    out: dict[str, torch.Tensor] = {}
    for key, t in dense.items():
        if key == "lm_head.weight_scale":
            continue
        if key == "lm_head.weight":
            scale = dense.get("lm_head.weight_scale")
            out[key], head_scale = _store(t if scale is None else dequantize_rows(t, scale), dtype)
            if head_scale is not None:
                out["lm_head.weight_scale"] = head_scale
            continue
        out[key] = (t.to(float_dtype) if t.is_floating_point() else t).contiguous()
    return out


def convert_packed(packed: PackedModel, dtype: torch.dtype, index: str | None = None) -> PackedModel:
    """`packed` with value dtype `dtype` and column encoding `index` (None: `default_index(dtype)`), as
    `pack_model` would have written the same weights: how a float export or checkpoint is quantized to
    int8 in memory (`chtsl bench --dtype int8`)."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype}; valid: {', '.join(DTYPES)}")
    index = index or default_index(dtype)
    if index not in INDEX_ENCODINGS:
        raise ChtslError(f"unknown index encoding {index!r}; valid: {', '.join(INDEX_ENCODINGS)}")
    float_dtype = default_float_dtype(dtype)
    linears = {name: _encode_linear(lin, dtype, index) for name, lin in packed.linears.items()}
    return PackedModel(config=packed.config, dtype=dtype, linears=linears,
                       dense=_encode_dense(packed.dense, dtype, float_dtype), float_dtype=float_dtype, index=index)


@torch.no_grad()
def pack_model(model: ChtslLlamaForCausalLM, dtype: torch.dtype = torch.float32, index: str | None = None
               ) -> PackedModel:
    """The packed form of a training-form model, in memory (docs/formats.md §2): the block linears and an
    untied lm_head in the value dtype `dtype` (int8: per-row scales), the other float tensors in
    `default_float_dtype(dtype)`; `index` the column encoding (None: `default_index(dtype)`)."""
    config: ChtslConfig = model.config
    linears = {name: pack_linear(name, layer) for name, layer in model.chtsl_layers().items()}
    skip = tied_keys(config)
    dense = {key: t.detach().cpu() for key, t in model.state_dict().items()
             if key.rsplit(".", 1)[0] not in linears and key not in skip}
    return convert_packed(PackedModel(config=config, dtype=torch.float32, linears=linears, dense=dense), dtype, index)


def _fixed_links(config: ChtslConfig) -> dict[str, int] | None:
    """Links per block linear type of a layer whose storage holds a support of fixed size (csr), as the
    model built from `config` holds them; None for a storage that holds S densified (masked)."""
    block = config.chtsl
    if get_storage(block["storage"]).holds_dense:
        return None
    rows = budget.layer_budgets(config.linear_shapes(), config.num_hidden_layers, block["method"],
                                block["sparsity"], block["rank"], config.head_dim)
    return {r.layer_type: r.sparse_params // config.num_hidden_layers for r in rows}


def training_state_dict(packed: PackedModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The training-form state dict of `packed` (tied keys absent): S in the storage its config names
    (masked: weight = S densified, mask = CSR pattern; csr: the CSR triple itself, as many links as the
    layer holds), A, B, the dense rest; int8 weights dequantized and column deltas decoded
    (`encoding.delta_decode`) into `dtype` (default: float32 for int8, else as stored)."""
    dtype = dtype or (torch.float32 if packed.dtype == torch.int8 else packed.dtype)
    storage = get_storage(packed.config.chtsl["storage"])
    state: dict[str, torch.Tensor] = {k: t for k, t in packed.dense.items() if not k.startswith("lm_head.")}
    if "lm_head.weight" in packed.dense:
        head, head_scale = packed.dense["lm_head.weight"], packed.dense.get("lm_head.weight_scale")
        state["lm_head.weight"] = head if head_scale is None else dequantize_rows(head, head_scale, dtype)
    fixed = _fixed_links(packed.config) if packed.index == "delta8" else None
    for name, lin in packed.linears.items():
        if lin.has_sparse:
            crow, col, values = lin.crow_indices, lin.col_indices, lin.part("values", dtype)
            if col.dtype == torch.uint8:  # a storage of fixed support size (csr) gets back as many links
                links = None if fixed is None else fixed[name.rsplit(".", 1)[1]]
                crow, col, values = delta_decode(crow, col, values, col_index_dtype(lin.in_features), links)
            entries = storage.from_csr(crow, col, values, lin.out_features, lin.in_features)
            state.update({f"{name}.{k}": t for k, t in entries.items()})
        elif lin.weight is not None:
            state[f"{name}.weight"] = lin.part("weight", dtype)
        if lin.has_lowrank:
            state[f"{name}.lora_A"] = lin.part("lora_A", dtype)
            state[f"{name}.lora_B"] = lin.part("lora_B", dtype)
    return state


@torch.no_grad()
def unpack_model(packed: PackedModel, dtype: torch.dtype | None = None) -> ChtslLlamaForCausalLM:
    """The training-form model of `packed` (`training_state_dict`), in eval mode.

    `dtype`: parameters' dtype, default the packed dtype (float32 for int8: pass torch.float32 to compute
    in fp32); int8 weights are dequantized, column deltas decoded.
    The global RNG is left untouched (building the model draws random masks, then overwritten).
    """
    dtype = dtype or (torch.float32 if packed.dtype == torch.int8 else packed.dtype)
    with torch.random.fork_rng(devices=[]):
        model = ChtslLlamaForCausalLM(packed.config)
    model = model.to(dtype)
    missing, unexpected = model.load_state_dict(training_state_dict(packed, dtype), strict=False)
    missing = [k for k in missing if k not in tied_keys(packed.config)]
    if missing or unexpected:
        raise ChtslError(f"packed model does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if packed.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def as_exported(model: ChtslLlamaForCausalLM, dtype: torch.dtype) -> ChtslLlamaForCausalLM:
    """`model` with the weights an export of value dtype `dtype` would hold (bf16 rounded, int8 quantized per
    row and dequantized), in fp32: how `chtsl eval` scores a checkpoint "as int8" without writing a file.
    `model` itself when `dtype` is float32."""
    if dtype == torch.float32:
        return model
    return unpack_model(pack_model(model, dtype), torch.float32)
