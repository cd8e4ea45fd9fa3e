"""The CPU kernels of the sparse branch (C in `csrc/`, compiled on first use, called through ctypes).

    table.py     every exported C function once: arguments, result, fp32/bf16 × int16/int32 variants;
                 the ctypes structs shared with C, checked against the library's own layout
    build.py     compiling, the validated cache of built libraries and build variants, the build in
                 force, `kernel(name, dtype=, index=)` (the one variant lookup), `cpu_kernel_status`
    settings.py  the run-time parameters (`KernelSettings`, `settings()`): tiles, cache budgets, chunks
    tune.py      self-tuning: the settings and build variants timed on first use on a machine, cached
                 beside the library (`CHTSL_TUNE=0`: the defaults), `kernel_info`; workloads.py: the calls it times
    sparse.py    the runtime's feature-major `S X` (`spmm_cpu`; `spmm_cuda` on CUDA; `spmm_a8` with int8
                 activations, on its own layout `A8Matrix`)
    decode.py    decoding at 1–4 tokens: GEMV, low-rank branch, block glue, all blocks in one call
    training.py  sparse-native training (`csr_mm`, `csr_sddmm`, `csr_transpose`) and CH2-L3n scores

Without a working C compiler every operation falls back to torch (correct, slower), and
`cpu_kernel_status()` says why.
"""

from chtsl_infer.kernels.build import cpu_kernel, cpu_kernel_status, kernel
from chtsl_infer.kernels.decode import (
    GEMV_MAX_TOKENS,
    LOWRANK_ACTIVATIONS,
    DecodeLayers,
    GroupDecoder,
    activation_dtype,
    attention_decode,
    decode_kernels_serve,
    dense_gemv,
    lowrank_fm,
    rms_norm_fm,
    silu_mul_fm,
)
from chtsl_infer.kernels.settings import KernelSettings, settings
from chtsl_infer.kernels.sparse import (
    A8Matrix,
    a8_pack,
    a8_panel_block,
    a8_panels,
    a8_round,
    sort_rows,
    spmm_a8,
    spmm_cpu,
    spmm_cuda,
    torch_csr,
)
from chtsl_infer.kernels.training import (
    ch2_l3n_half,
    csr_mm,
    csr_mm_torch,
    csr_sddmm,
    csr_sddmm_torch,
    csr_transpose,
)
from chtsl_infer.kernels.tune import kernel_info  # also registers the tuner with build.current()

__all__ = [
    "A8Matrix", "GEMV_MAX_TOKENS", "LOWRANK_ACTIVATIONS", "DecodeLayers", "GroupDecoder", "KernelSettings",
    "a8_pack", "a8_panel_block", "a8_panels", "a8_round", "activation_dtype", "attention_decode",
    "ch2_l3n_half", "cpu_kernel", "cpu_kernel_status", "csr_mm", "csr_mm_torch", "csr_sddmm", "csr_sddmm_torch",
    "csr_transpose", "decode_kernels_serve", "dense_gemv", "kernel", "kernel_info", "lowrank_fm", "rms_norm_fm",
    "settings", "silu_mul_fm", "sort_rows", "spmm_a8", "spmm_cpu", "spmm_cuda", "torch_csr",
]
