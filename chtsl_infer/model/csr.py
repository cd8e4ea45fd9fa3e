"""Sparse-native training of the sparse branch: S held as CSR values, `y = x Sᵀ` as one autograd op.

`CsrStructure` is the support of S (out × in) — row pointers, column indices and the transposed
index the backward needs — built once per topology. `csr_linear(x, values, structure)` is the
sparse counterpart of `F.linear(x, S)`:

    forward   y  = x Sᵀ                       (..., in) -> (..., out)
    backward  dx = dy S                        the same sparse kernel on the transposed structure
              dvalues[k] = Σ_n dy[n, row_k] · x[n, col_k]   (SDDMM: active positions only)

No dense (out × in) floating-point tensor is created in either direction.

Value order: value k sits at (row k, col[k]) with rows ascending and columns ascending within a row,
the order of `mask.nonzero()` — so `values = weight[mask]` and `weight[mask] = values` convert
from and to the masked form.

Precision: the products are computed in float32 (float64 when x or the values are float64, e.g.
for gradcheck), whatever the autocast state: sums over up to `in_features` links in bfloat16 would
lose the small updates that sparse training depends on, and the compiled CPU kernels are fp32.
The output and dx have x's dtype (so a bf16 activation stays bf16), dvalues has the values' dtype.

Kernels (`chtsl_infer.kernels`): compiled C on CPU, torch's sparse CSR ops (cuSPARSE) on CUDA and as
the CPU fallback when no C compiler works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from chtsl_infer import kernels

INDEX_MAX = 2**31 - 1  # indices are int32: cuSPARSE's and the C kernels' index type


def col_index_dtype(in_features: int) -> torch.dtype:
    """int16 CSR column indices when they fit (in_features ≤ 32767), else int32 (docs/formats.md §2)."""
    return torch.int16 if in_features <= 32767 else torch.int32


def mask_to_csr(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(crow int32 (out+1,), col int16/int32 (nnz,)) of a bool (out × in) mask, row-major order
    (the order of `mask.nonzero()`: rows ascending, columns ascending within a row)."""
    crow = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
    crow[1:] = torch.cumsum(mask.sum(dim=1), 0)
    cols = mask.nonzero(as_tuple=True)[1]
    return crow.to(torch.int32), cols.to(col_index_dtype(mask.shape[1]))


@dataclass
class CsrStructure:
    """The support of an (n_rows × n_cols) sparse matrix in row-major CSR order, plus its transpose.

    crow    int32 (n_rows+1,)  row i's links are value indices crow[i] .. crow[i+1]-1
    col     int32 (nnz,)       column of value k (ascending within a row)
    t_crow  int32 (n_cols+1,)  the transpose's row pointers: column j's links are t_crow[j] .. t_crow[j+1]-1
    t_row   int32 (nnz,)       row of transposed entry e (ascending within a column)
    t_perm  int32 (nnz,)       value index of transposed entry e: Sᵀ's values are values[t_perm]
    """

    n_rows: int
    n_cols: int
    crow: torch.Tensor
    col: torch.Tensor
    t_crow: torch.Tensor
    t_row: torch.Tensor
    t_perm: torch.Tensor

    @property
    def nnz(self) -> int:
        """Number of stored links (the length of the values vector)."""
        return self.col.numel()

    @property
    def device(self) -> torch.device:
        return self.crow.device

    @classmethod
    def _build(cls, crow: torch.Tensor, col: torch.Tensor, n_rows: int, n_cols: int) -> CsrStructure:
        """Adds the transposed index to a valid (crow, col) of int32."""
        return cls(n_rows, n_cols, crow, col, *kernels.csr_transpose(crow, col, n_cols))

    @classmethod
    def from_crow_col(cls, crow: torch.Tensor, col: torch.Tensor, n_cols: int) -> CsrStructure:
        """The structure of stored CSR indices, validated; `ValueError` (one line) if they are corrupt.

        crow: integer (n_rows+1,) starting at 0, non-decreasing, ending at len(col);
        col: integer (nnz,) in [0, n_cols), strictly ascending within each row.
        """
        if crow.dim() != 1 or col.dim() != 1 or crow.numel() < 1:
            raise ValueError(f"CSR indices must be 1-D with at least one row pointer, got crow of shape "
                             f"{tuple(crow.shape)} and col of shape {tuple(col.shape)}")
        if crow.is_floating_point() or col.is_floating_point() or crow.dtype == torch.bool or col.dtype == torch.bool:
            raise ValueError(f"CSR indices must be integers, got crow {crow.dtype} and col {col.dtype}")
        if not 0 <= n_cols <= INDEX_MAX or col.numel() > INDEX_MAX:
            raise ValueError(f"CSR of {n_cols} columns and {col.numel()} links does not fit int32 indices")
        crow64, col64 = crow.long(), col.long()
        nnz = col.numel()
        if int(crow64[0]) != 0:
            raise ValueError(f"CSR row pointers must start at 0, got {int(crow64[0])}")
        if bool((crow64[1:] < crow64[:-1]).any()):
            bad = int((crow64[1:] < crow64[:-1]).nonzero()[0, 0])
            raise ValueError(f"CSR row pointers decrease at row {bad} ({int(crow64[bad])} -> {int(crow64[bad + 1])})")
        if int(crow64[-1]) != nnz:
            raise ValueError(f"CSR row pointers end at {int(crow64[-1])} but there are {nnz} column indices")
        if nnz and (int(col64.min()) < 0 or int(col64.max()) >= n_cols):
            raise ValueError(f"CSR column index out of range [0, {n_cols}): min {int(col64.min())}, "
                             f"max {int(col64.max())}")
        if nnz > 1:
            n_rows = crow.numel() - 1
            rows = torch.repeat_interleave(torch.arange(n_rows, device=crow.device), crow64[1:] - crow64[:-1])
            unsorted = (rows[1:] == rows[:-1]) & (col64[1:] <= col64[:-1])
            if bool(unsorted.any()):
                k = int(unsorted.nonzero()[0, 0])
                raise ValueError(f"CSR columns of row {int(rows[k])} are not strictly ascending "
                                 f"({int(col64[k])} then {int(col64[k + 1])})")
        return cls._build(crow.to(torch.int32).contiguous(), col.to(torch.int32).contiguous(),
                          crow.numel() - 1, n_cols)

    def row_indices(self) -> torch.Tensor:
        """Row of each value: int64 (nnz,), ascending."""
        return torch.repeat_interleave(torch.arange(self.n_rows, device=self.device),
                                       (self.crow[1:] - self.crow[:-1]).long())

    def to_mask(self) -> torch.Tensor:
        """The bool (n_rows, n_cols) support (for topology scoring and tests, not the training path)."""
        mask = torch.zeros(self.n_rows, self.n_cols, dtype=torch.bool, device=self.device)
        mask[self.row_indices(), self.col.long()] = True
        return mask

    def to(self, device: torch.device | str) -> CsrStructure:
        """The same structure with its index tensors on `device`."""
        return CsrStructure(self.n_rows, self.n_cols, self.crow.to(device), self.col.to(device),
                            self.t_crow.to(device), self.t_row.to(device), self.t_perm.to(device))


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any operand is float64, else float32 (see the module docstring)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class _CsrLinear(torch.autograd.Function):
    """y = x Sᵀ on a flattened (N, in) x; see `csr_linear`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, structure: CsrStructure) -> torch.Tensor:
        dtype = _compute_dtype(x, values)
        with torch.autocast(x.device.type, enabled=False):
            y = kernels.csr_mm(x.to(dtype), structure.crow, structure.col, values.to(dtype), structure.n_rows)
        ctx.save_for_backward(x, values)
        ctx.structure = structure
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, values = ctx.saved_tensors
        st: CsrStructure = ctx.structure
        dtype = _compute_dtype(x, values, dy)
        dy = dy.to(dtype)
        dx = dvalues = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                t_values = values.to(dtype).index_select(0, st.t_perm)  # Sᵀ's values (nnz,)
                dx = kernels.csr_mm(dy, st.t_crow, st.t_row, t_values, st.n_cols).to(x.dtype)
            if ctx.needs_input_grad[1]:
                dvalues = kernels.csr_sddmm(dy, x.to(dtype), st.crow, st.col, st.n_cols).to(values.dtype)
        return dx, dvalues, None


def csr_linear(x: torch.Tensor, values: torch.Tensor, structure: CsrStructure) -> torch.Tensor:
    """`x Sᵀ` with S = (structure, values): x (..., in) -> (..., out), differentiable in x and values.

    values: (nnz,) in `structure`'s order. Equals `F.linear(x, W * mask)` with `W[mask] = values`,
    gradients included, without forming the dense (out × in) matrix.
    """
    if x.shape[-1] != structure.n_cols:
        raise ValueError(f"csr_linear: input has {x.shape[-1]} features, the structure {structure.n_cols} columns")
    if values.shape != (structure.nnz,):
        raise ValueError(f"csr_linear: values must have shape ({structure.nnz},), got {tuple(values.shape)}")
    lead = x.shape[:-1]
    y = _CsrLinear.apply(x.reshape(math.prod(lead), structure.n_cols), values, structure)
    return y.reshape(*lead, structure.n_rows)
