"""A fused group of linears that read the same input, as the inference runtime computes them.

Each decoder block's seven linears become four groups — (q, k, v), (o), (gate, up), (down) — so
one call computes every member at once: one sparse kernel over the concatenated CSR rows, one GEMM
with the concatenated A factors (`backends.build_model` builds them; `feature_major` calls them).
`FusedMember` stands where a member linear stood, so transformers' own forward still works.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from chtsl_infer import kernels
from chtsl_infer.errors import ChtslError
from chtsl_infer.formats.encoding import delta_decode
from chtsl_infer.formats.packed import QUANTIZED_PARTS, PackedLinear, col_index_dtype
from chtsl_infer.kernels import build
from chtsl_infer.model.layers import activation_fn
from chtsl_infer.runtime.int8 import Int8Linear, int8_mm

A8_BUFFERS = ("a8_steps", "a8_start", "a8_data", "a8_spill_n", "a8_spill_start", "a8_spill")  # A8Matrix.tensors()
DENSE_PATHS = ("torch", "gemv")  # how a dense weight multiplies a few decoding tokens (`dense_fm`)


def _widen_deltas() -> bool:
    """Whether the CPU kernels hold 8-bit column deltas as absolute columns on this machine
    (`KernelSettings.widen_deltas`, as tuned: the first kernel use of a process puts the tuning in force).
    AMD Zen 4, llama1b-c4 decoding: 1.14× the tokens/s with int8 values, 1.18× with bf16, for 1 byte
    more per link: the gather loops are bound by the deltas' serial prefix sum, not by memory."""
    build.current()
    return bool(kernels.settings().widen_deltas)


class FusedLinears(nn.Module):
    """Several linears sharing an input, computed together: x (..., in) -> (..., Σ out_m).

    Buffers (present parts only): `weight` (Σout, in) dense S or dense-method weight; `crow`,
    `col`, `values`, `rows` the CSR of S with the members' rows stacked, stored by link count
    (`rows`: stored row -> output row; CPU sparse backend; `col` int16/int32 columns, or uint8
    column deltas as packed unless `KernelSettings.widen_deltas` has them widened); `lora_A` (Σr,
    in); `lora_B` the members' B (out_m, r_m) blocks flattened back to back, `lowrank_shapes` int32
    (2, members) their out_m and r_m. With `int8`, `values`, `weight`, `lora_A` and `lora_B` are the
    packed int8 weights and `values_scale` (stored rows), `weight_scale`, `lora_A_scale` (Σr,) and
    `lora_B_scale` (Σout,) their fp32 row scales; activations are fp32. After `use_int8_activations`,
    S is held as `A8_BUFFERS` (`kernels.A8Matrix`, with `values_scale` and `rows`) instead of its CSR,
    and `lora_B` as `kernels.a8_panels`.
    Members fetch their slice through `member(i, x)`, which computes the whole group once per
    distinct input tensor. `dense_path`: how a dense float `weight` multiplies 1 … `GEMV_MAX_TOKENS`
    decoding tokens (`dense_fm`; `set_dense_path`; an int8 weight always takes `int8_mm`).
    """

    dense_path = "torch"

    def __init__(self, linears: list[PackedLinear], sparse: bool, device: torch.device, dtype: torch.dtype,
                 torch_csr: bool | None = None, int8: bool = False) -> None:
        """`torch_csr`: keep S as a `torch.sparse_csr_tensor` computed by `kernels.spmm_cuda` (cuSPARSE
        on CUDA) instead of the CPU kernel's buffers; None: on CUDA only. Tests set it on CPU, where
        torch's CSR matmul (fp32 only) runs the same tensor code as the CUDA path. `int8`: keep int8
        weights as int8 (CPU, fp32 `dtype`: the compiled int8 kernels); otherwise they are dequantized
        into `dtype`."""
        super().__init__()
        device = torch.device(device)
        first = linears[0]
        self.in_features = first.in_features
        self.outs = [lin.out_features for lin in linears]
        self.offsets = [0, *torch.tensor(self.outs).cumsum(0).tolist()]
        self.activation, self.scale = first.activation, first.scale
        self.sparse = False
        self.nnz = 0
        self.cuda_csr: torch.Tensor | None = None
        self.int8 = int8 = int8 and any(getattr(first, part) is not None and getattr(first, part).dtype == torch.int8
                                        for part in QUANTIZED_PARTS)
        for part in QUANTIZED_PARTS:  # None unless int8 weights are kept
            self.register_buffer(f"{part}_scale", None)
        if first.has_sparse and sparse:
            self.sparse = True
            crow = [torch.zeros(1, dtype=torch.int64)]
            base = 0
            for lin in linears:
                crow.append(lin.crow_indices[1:].long() + base)
                base += lin.nnz
            crow_t = torch.cat(crow)
            self.nnz = base  # links of S (whatever layout holds them)
            col = torch.cat([lin.col_indices for lin in linears])
            if torch_csr if torch_csr is not None else device.type == "cuda":
                values = torch.cat([lin.part("values", dtype) for lin in linears])
                self.cuda_csr = kernels.torch_csr(crow_t, col, values, (self.offsets[-1], self.in_features),
                                                  device, dtype)
            else:  # the C kernel reads int32 row pointers, int16/int32 columns or deltas, fp32/bf16/int8 values
                values_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
                values = torch.cat([lin.values if int8 else lin.part("values", values_dtype) for lin in linears])
                if col.dtype == torch.uint8 and _widen_deltas():
                    crow_t, col, values = delta_decode(crow_t, col, values, col_index_dtype(self.in_features))
                crow_s, col_s, values_s, rows = kernels.sort_rows(crow_t.to(torch.int32), col, values)
                self.register_buffer("crow", crow_s)  # rows stored by link count (see kernels.sort_rows)
                self.register_buffer("col", col_s)
                self.register_buffer("values", values_s)
                self.register_buffer("rows", rows)
                if int8:  # the stored rows' scales
                    scale = torch.cat([lin.values_scale for lin in linears])
                    self.register_buffer("values_scale", scale[rows.long()].contiguous())
            self.weight = None
        elif first.has_sparse:
            self.register_buffer("weight", torch.cat([lin.dense_sparse_weight(dtype) for lin in linears]).to(device))
        elif first.weight is not None:
            self._factor("weight", [lin.weight for lin in linears], [lin.weight_scale for lin in linears], linears,
                         device, dtype)
        else:
            self.weight = None
        if first.has_lowrank:
            self.ranks = [lin.lora_A.shape[0] for lin in linears]
            self._factor("lora_A", [lin.lora_A for lin in linears], [lin.lora_A_scale for lin in linears], linears,
                         device, dtype)
            # The members' B (out_m × r_m) flattened back to back: the decode kernel's layout.
            self._factor("lora_B", [lin.lora_B for lin in linears], [lin.lora_B_scale for lin in linears], linears,
                         device, dtype)
            self.register_buffer("lowrank_shapes", torch.tensor([self.outs, self.ranks], dtype=torch.int32))
        else:
            self.lora_A = self.lora_B = None
        for name in A8_BUFFERS:  # S's layout after `use_int8_activations`
            self.register_buffer(name, None)
        self._x: torch.Tensor | None = None
        self._parts: list[torch.Tensor | None] = []
        self._decoder: kernels.GroupDecoder | None | bool = None  # built on first decode; False: does not apply
        self._decoder_dtype: torch.dtype | None = None

    def _factor(self, name: str, parts: list[torch.Tensor], scales: list[torch.Tensor | None],
                linears: list[PackedLinear], device: torch.device, dtype: torch.dtype) -> None:
        """Registers the members' `name` (weight, lora_A: stacked rows; lora_B: flattened blocks) as int8
        with `<name>_scale` (kept int8), else in `dtype` (int8 dequantized)."""
        flat = name == "lora_B"
        if self.int8:
            self.register_buffer(name, torch.cat([t.reshape(-1) if flat else t for t in parts]).to(device))
            self.register_buffer(f"{name}_scale", torch.cat(scales).to(device))  # type: ignore[arg-type]
            return
        floats = [lin.part(name, dtype) for lin in linears]
        self.register_buffer(name, torch.cat([t.reshape(-1) if flat else t for t in floats]).to(device))

    def use_int8_activations(self, spill_cost: int | None = None) -> bool:
        """Holds S in `kernels.spmm_a8`'s layout from now on: its products round their input to int8 per
        256 features of each token (int8 weights and activations, int32 sums within a page; 3.4× the
        links per second of the fp32-activation gather on AMD Zen 4, see csrc/spmm_a8.c). The CSR
        buffers are freed. Returns False (nothing changed) where S is not an int8 CSR of the CPU kernels.
        The low-rank A takes the same rounded input and B, held in `kernels.a8_panels` from now on, its
        input h rounded per member (`kernels.lowrank_fm` with `int8_activations`; where it does not
        apply, the float products with `kernels.a8_round`'s values); every operation outside the group
        keeps fp32 activations. `spill_cost`: `kernels.a8_pack`'s
        (None: its default)."""
        if self.a8_data is not None:
            return True
        if not (self.sparse and self.int8 and self.cuda_csr is None and self.crow is not None
                and self.crow.device.type == "cpu" and kernels.cpu_kernel_status()[0]):
            return False
        layout = kernels.a8_pack(self.crow, self.col, self.values, self.values_scale, self.rows, self.in_features,
                                 *(() if spill_cost is None else (spill_cost,)))
        for name, tensor in zip(A8_BUFFERS, layout.tensors(), strict=True):
            self.register_buffer(name, tensor)
        self.crow = self.col = self.values = None  # registered buffers, now absent
        if self.lora_B is not None:  # B in the panels of the int8-activation kernel (kernels.a8_panels)
            self.lora_B = kernels.a8_panels(self.lora_B, self.outs, self.ranks)
        self._decoder = None
        return True

    def a8_layout(self) -> kernels.A8Matrix | None:
        """S as `kernels.A8Matrix` after `use_int8_activations`, else None."""
        if self.a8_data is None:
            return None
        assert self.values_scale is not None
        return kernels.A8Matrix(self.in_features, *(getattr(self, name) for name in A8_BUFFERS), self.values_scale,
                                self.rows)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FusedLinears:
        self._decoder = None  # .to(), .float(), …: the buffers are replaced, so are the pointers bound to them
        return super()._apply(fn, recurse)

    def decoder(self) -> kernels.GroupDecoder | None:
        """The group's `kernels.GroupDecoder` where its tensors are CPU fp32 or bf16 (one dtype), or int8
        (fp32 activations), and the kernels built, else None."""
        if self._decoder is None:
            sparse_values = None
            if self.sparse and self.cuda_csr is None:  # int8 activations: no CSR values; the row scales stand in
                sparse_values = self.values_scale if self.a8_data is not None else self.values
            tensors = [t for t in (sparse_values, self.lora_A, self.weight) if t is not None]
            serve = bool(tensors) and self.cuda_csr is None and kernels.decode_kernels_serve(*tensors)
            a8 = self.a8_layout()
            csr = (self.crow, self.col, self.values, self.rows, self.values_scale) if (
                self.sparse and serve and a8 is None) else None
            lowrank = ((self.lora_A, self.lora_B, self.lowrank_shapes, self.lora_A_scale, self.lora_B_scale)
                       if self.lora_A is not None else None)
            self._decoder = serve and kernels.GroupDecoder(
                self.in_features, self.offsets[-1], csr, lowrank, self.scale, self.activation, a8=a8)
            self._decoder_dtype = kernels.activation_dtype(*tensors) if serve else None
        return self._decoder or None

    def forward_fm(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Feature-major: x (in, T) -> (Σ out_m, T), every member's rows stacked.

        `out`: a contiguous (Σ out_m, T) tensor to write into (a reused buffer: no page faults).
        """
        if out is None:
            out = x.new_empty(self.offsets[-1], x.shape[1])
        decoder = self.decoder() if x.shape[1] <= kernels.GEMV_MAX_TOKENS else None
        if (decoder is not None and x.dtype == self._decoder_dtype == out.dtype and x.device.type == "cpu"
                and (x.shape[1] == 1 or x.stride(1) == 1 and out.stride(1) == 1)):  # one token: any strides
            if decoder.has_sparse:
                decoder.sparse(x, out)
            elif self.weight is not None:
                self._dense(x, out, self.dense_path)
            else:
                out.zero_()
            if decoder.lowrank is not None:
                decoder.add_lowrank(x, out)
            return out
        if self.sparse:
            if self.cuda_csr is not None:
                y = out.copy_(kernels.spmm_cuda(x, self.cuda_csr))
            elif self.a8_data is not None:
                a8 = self.a8_layout()
                assert a8 is not None
                y = kernels.spmm_a8(x.float(), a8, out=out if x.dtype == torch.float32 else None)
                y = y if y is out else out.copy_(y)
            elif x.dtype == self.values.dtype or self.int8 and x.dtype == torch.float32:  # fp32, bf16, int8
                y = kernels.spmm_cpu(x, self.crow, self.col, self.values, out=out, rows=self.rows,
                                     scale=self.values_scale)
            else:
                y = out.copy_(kernels.spmm_cpu(x.float(), self.crow, self.col, self.values, rows=self.rows,
                                               scale=self.values_scale))
        elif self.weight is not None:
            y = self._dense(x, out)
        else:
            y = out.zero_()
        a8 = self.a8_data is not None  # int8 activations: A's input rounded as S's is
        if self.lora_A is not None and not kernels.lowrank_fm(self.lora_A, x, self.lora_B, self.lowrank_shapes,
                                                               self.scale, self.activation, y, self.lora_A_scale,
                                                               self.lora_B_scale, int8_activations=a8):
            x_a = kernels.a8_round(x.float()) if a8 else x
            h = self.lora_A @ x_a if self.lora_A_scale is None else int8_mm(self.lora_A, self.lora_A_scale, x_a)
            h = F.silu(h, inplace=True) if self.activation == "silu" else activation_fn(self.activation, h)
            r0 = b0 = 0
            for i, r in enumerate(self.ranks):
                n_out, rows = self.outs[i], slice(self.offsets[i], self.offsets[i + 1])
                if a8:  # B's input rounded per member, after the scale, as the kernels do
                    b = kernels.a8_panel_block(self.lora_B, self.outs, self.ranks, i)
                    y[rows].add_(int8_mm(b, self.lora_B_scale[rows], kernels.a8_round(self.scale * h[r0:r0 + r], r)))
                elif self.lora_B_scale is None:
                    b = self.lora_B[b0:b0 + n_out * r].view(n_out, r)
                    y[rows].addmm_(b, h[r0:r0 + r], alpha=self.scale)
                else:
                    b = self.lora_B[b0:b0 + n_out * r].view(n_out, r)
                    y[rows].add_(int8_mm(b, self.lora_B_scale[rows], h[r0:r0 + r]), alpha=self.scale)
                r0, b0 = r0 + r, b0 + n_out * r
        return y

    def _dense(self, x: torch.Tensor, out: torch.Tensor, path: str = "torch") -> torch.Tensor:
        """out = weight x: the dense base (a densified S or a dense method's weight; int8: with its scales;
        float: by `path`, `dense_fm`)."""
        if self.weight_scale is not None:
            return int8_mm(self.weight, self.weight_scale, x, out=out)
        return dense_fm(self.weight, x, out, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token-major (the transformers path: KV cache, decoding): x (..., in) -> (..., Σ out_m)."""
        lead = x.shape[:-1]
        y = self.forward_fm(x.reshape(-1, self.in_features).t())
        return y.t().contiguous().view(*lead, self.offsets[-1])

    def member(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Output of member `index` for input x, computing the group once per input tensor."""
        if self._x is not x or self._parts[index] is None:
            y = self.forward(x)
            self._x = x
            self._parts = [y[..., self.offsets[i]:self.offsets[i + 1]] for i in range(len(self.outs))]
        out = self._parts[index]
        self._parts[index] = None
        if all(p is None for p in self._parts):  # every member served: drop the references
            self._x, self._parts = None, []
        assert out is not None
        return out


def dense_fm(weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor, path: str = "torch") -> torch.Tensor:
    """out (n_out, T) = weight (n_out, in) · x (in, T), feature-major; `path` one of `DENSE_PATHS`.

    "torch": `torch.mm` (MKL's GEMV/GEMM). "gemv": the project's GEMV (`kernels.dense_gemv`, the
    lm_head's) for 1 … `GEMV_MAX_TOKENS` CPU tokens in fp32 or bf16, which streams the weight faster
    than torch's on some CPUs (`chtsl bench` measures both: `runtime.machine.time_dense_paths`);
    torch where it does not apply. `out` has contiguous rows.
    """
    if path == "gemv" and x.shape[1] <= kernels.GEMV_MAX_TOKENS:
        if x.shape[1] == 1:  # (n_out, 1) is (1, n_out) with contiguous rows: no copy
            if kernels.dense_gemv(weight, x.t(), out.t()):
                return out
        else:  # the kernel writes token-major rows
            tm = out.new_empty(x.shape[1], out.shape[0])
            if kernels.dense_gemv(weight, x.t(), tm):
                return out.copy_(tm.t())
    return torch.mm(weight, x, out=out)


def use_int8_activations(model: nn.Module, spill_cost: int | None = None) -> int:
    """`FusedLinears.use_int8_activations` on every group of `model` (an int8 model on the CPU sparse
    backend): its sparse products and low-rank A then run with int8 activations, and so does an int8
    lm_head (`runtime.int8.Int8Linear`) once any group does. Returns how many groups do."""
    groups = sum(m.use_int8_activations(spill_cost) for m in model.modules() if isinstance(m, FusedLinears))
    head = getattr(model, "lm_head", None)
    if groups and isinstance(head, Int8Linear):
        head.int8_activations = True
    return groups


def set_dense_path(model: nn.Module, path: str) -> None:
    """Makes every `FusedLinears` of `model` multiply its dense weight (if any) by `path` (`dense_fm`)."""
    if path not in DENSE_PATHS:
        raise ChtslError(f"unknown dense path {path!r}; valid: {', '.join(DENSE_PATHS)}")
    for m in model.modules():
        if isinstance(m, FusedLinears):
            m.dense_path = path


class FusedMember(nn.Module):
    """Stands where one linear of a group stood; returns its slice of the group's output."""

    def __init__(self, group: FusedLinears, index: int, owner: bool) -> None:
        super().__init__()
        if owner:  # the group's tensors are registered once, under its first member
            self.group = group
        else:
            object.__setattr__(self, "group", group)
        self.index = index
        self.in_features, self.out_features = group.in_features, group.outs[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.member(self.index, x)
