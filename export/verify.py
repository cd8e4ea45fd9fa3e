"""Verification of exported files against the PyTorch model on random token batches.

Each export is run on batches of shapes not used at export time (the ONNX graph was traced at
`export.onnx.EXPORT_SHAPE`) and its logits compared with the training-form model's, in fp32:

  packed fp32       max |Δlogits| ≤ 1e-6   (the reload must be exact up to summation order)
  packed fp16/bf16  ‖Δlogits‖_F / ‖logits‖_F ≤ 1e-2   (weights rounded to the packed dtype,
                    computed in fp32; a max-abs bound would be dominated by single rounding
                    outliers in bf16's 8-bit mantissa)
  ONNX (fp32)       max |Δlogits| ≤ 1e-4 on every available execution provider
  runtime (`--device`)  the packed file through the inference runtime's dense and sparse backends
                    (fused groups, feature-major forward; cuSPARSE on CUDA) in fp32 on that device:
                    max |Δlogits| ≤ 1e-4 for an fp32 file, else the packed fp16/bf16 bound
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.table import Table

from chtsl_infer.modeling import ChtslLlamaForCausalLM

VERIFY_SHAPES: tuple[tuple[int, int], ...] = ((1, 11), (3, 5))  # (batch, seq), ≠ EXPORT_SHAPE
TOL_PACKED_FP32 = 1e-6
TOL_PACKED_REL = 1e-2
TOL_ONNX = 1e-4
DTYPE_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Check:
    """One comparison: an export on one runtime and one batch shape."""

    file: str  # "packed" or "onnx"
    runtime: str
    shape: tuple[int, int]
    max_abs: float  # max |Δlogits|
    rel: float  # ‖Δlogits‖_F / ‖logits‖_F
    metric: str  # "max_abs" or "rel": which of the two is held to `tol`
    tol: float

    @property
    def ok(self) -> bool:
        value = self.max_abs if self.metric == "max_abs" else self.rel
        return bool(value <= self.tol)  # NaN fails

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def random_batches(
    vocab_size: int, shapes: tuple[tuple[int, int], ...] = VERIFY_SHAPES, seed: int = 0
) -> list[torch.Tensor]:
    """Uniformly random int64 token ids, one (batch, seq) tensor per shape (seeded, CPU)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, shape, generator=g) for shape in shapes]


@torch.no_grad()
def reference_logits(model: ChtslLlamaForCausalLM, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 logits (batch, seq, vocab) of the training-form model for each batch."""
    model = model.float().eval()
    return [model(input_ids=ids, use_cache=False).logits.float() for ids in batches]


def _compare(file: str, runtime: str, ids: torch.Tensor, ref: torch.Tensor, out: torch.Tensor,
             metric: str, tol: float) -> Check:
    diff = (out.float() - ref).abs()
    rel = float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(ref).clamp_min(1e-30))
    return Check(file, runtime, (ids.shape[0], ids.shape[1]), float(diff.max()), rel, metric, tol)


@torch.no_grad()
def verify_packed(path: str | Path, batches: list[torch.Tensor], refs: list[torch.Tensor]) -> list[Check]:
    """Reloads the packed file (validated), rebuilds the model in fp32, compares logits."""
    from chtsl_infer.packed import load_packed, unpack_model

    packed = load_packed(path)
    model = unpack_model(packed, torch.float32)
    exact = packed.dtype == torch.float32
    metric, tol = ("max_abs", TOL_PACKED_FP32) if exact else ("rel", TOL_PACKED_REL)
    runtime = f"torch {DTYPE_SHORT[packed.dtype]}"
    return [
        _compare("packed", runtime, ids, ref, model(input_ids=ids, use_cache=False).logits, metric, tol)
        for ids, ref in zip(batches, refs, strict=True)
    ]


@torch.no_grad()
def verify_runtime(directory: str | Path, batches: list[torch.Tensor], refs: list[torch.Tensor],
                   device: str | torch.device) -> list[Check]:
    """Loads the packed export in `directory` with the runtime's torch backends on `device` (fp32)
    and compares their logits with the references (computed on CPU)."""
    from chtsl_infer.packed import WEIGHTS_NAME, load_packed
    from chtsl_infer.runtime import load_runtime

    exact = load_packed(Path(directory) / WEIGHTS_NAME).dtype == torch.float32
    metric, tol = ("max_abs", TOL_ONNX) if exact else ("rel", TOL_PACKED_REL)
    device = torch.device(device)
    checks = []
    for backend in ("dense", "sparse"):
        rt = load_runtime(directory, backend, device, torch.float32)
        for ids, ref in zip(batches, refs, strict=True):
            checks.append(_compare("packed", f"runtime {backend} {device.type}", ids, ref, rt.logits(ids).cpu(),
                                   metric, tol))
        del rt
    return checks


def verify_onnx(path: str | Path, batches: list[torch.Tensor], refs: list[torch.Tensor]) -> list[Check]:
    """Runs the ONNX file in ONNX Runtime on every available provider (CPU, CUDA), compares logits."""
    from export.onnx import providers, session

    checks = []
    for provider in providers():
        sess = session(path, provider)
        for ids, ref in zip(batches, refs, strict=True):
            (logits,) = sess.run(["logits"], {"input_ids": ids.numpy()})
            name = provider.removesuffix("ExecutionProvider")
            checks.append(_compare("onnx", f"ORT {name}", ids, ref, torch.from_numpy(logits),
                                   "max_abs", TOL_ONNX))
    return checks


def checks_table(checks: list[Check]) -> Table:
    """Rich table: file, runtime, shape, max |Δlogits|, relative error, tolerance, verdict."""
    table = Table(title="Verification vs PyTorch (fp32 logits)")
    for col in ("export", "runtime", "shape", "max |Δ|", "rel ‖Δ‖", "tolerance", "ok"):
        table.add_column(col, justify="left" if col in ("export", "runtime") else "right", no_wrap=True)
    for c in checks:
        tol = f"{'max' if c.metric == 'max_abs' else 'rel'} ≤ {c.tol:.0e}"
        verdict = "[green]yes[/]" if c.ok else "[bold red]FAIL[/]"
        table.add_row(c.file, c.runtime, f"{c.shape[0]}×{c.shape[1]}", f"{c.max_abs:.2e}", f"{c.rel:.2e}", tol,
                      verdict)
    return table
