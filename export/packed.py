"""Packed safetensors export: CSR sparse branch + low-rank factors (format in chtsl_infer/formats/packed.py).

Writes `<out>/model.safetensors` from a loaded checkpoint model (through
`chtsl_infer.formats.model_dir.save_packed`) and accounts for its bytes against dense linears.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from chtsl_infer.formats.model_dir import WEIGHTS_NAME, save_packed
from chtsl_infer.formats.packed import PackedModel, pack_model
from chtsl_infer.model.modeling import ChtslLlamaForCausalLM


@dataclass
class PackedStats:
    """Bytes of a packed file, and of the same model with dense block linears (same dtype), and what a
    decoded token reads (`PackedModel.decode_bytes`: "per_link", "total", by part)."""

    file_bytes: int
    linear_bytes: int  # CHTsL linears: CSR triples + factors (or dense weights for `dense`)
    dense_linear_bytes: int  # the block linears as dense (out, in) matrices
    nnz: int
    decode: dict[str, float] = field(default_factory=dict)

    @property
    def dense_equivalent_bytes(self) -> int:
        return self.file_bytes - self.linear_bytes + self.dense_linear_bytes


def packed_stats(packed: PackedModel, file_bytes: int) -> PackedStats:
    """Byte accounting of `packed` whose file takes `file_bytes`."""
    element = torch.empty((), dtype=packed.dtype).element_size()
    return PackedStats(
        file_bytes=file_bytes,
        linear_bytes=sum(lin.nbytes() for lin in packed.linears.values()),
        dense_linear_bytes=sum(element * lin.in_features * lin.out_features for lin in packed.linears.values()),
        nnz=sum(lin.nnz for lin in packed.linears.values()),
        decode=packed.decode_bytes(),
    )


def write_packed(model: ChtslLlamaForCausalLM, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                 index: str | None = None) -> PackedStats:
    """Packs `model` in `dtype` (column encoding `index`, None: the dtype's default) into
    `out_dir/model.safetensors` (atomic); returns its byte stats."""
    path = Path(out_dir) / WEIGHTS_NAME
    packed = pack_model(model, dtype, index)
    save_packed(packed, path)
    return packed_stats(packed, path.stat().st_size)
