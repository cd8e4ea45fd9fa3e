"""Verification of exported files against the PyTorch model on random token batches.

Each export is run on batches of shapes not used at export time (the ONNX graph was traced at
`export.onnx.EXPORT_SHAPE`) and its logits compared with the training-form model's, in fp32:

  packed fp32       max |Δlogits| ≤ 1e-6   (the reload must be exact up to summation order)
  packed fp16/bf16  ‖Δlogits‖_F / ‖logits‖_F ≤ 1e-2   (weights rounded to the packed dtype,
                    computed in fp32; a max-abs bound would be dominated by single rounding
                    outliers in bf16's 8-bit mantissa)
  packed int8       ‖Δlogits‖_F / ‖logits‖_F ≤ 5e-2   (weights quantized per row to 8 bits:
                    1–2.5 % on the tiny test models of every method)
  ONNX (fp32)       max |Δlogits| ≤ 1e-4 on every available execution provider, for full
                    sequences (empty cache) and, with the KV cache, for a prefill of
                    `CACHED_PROMPT` tokens then `DECODE_STEPS` one-token steps each fed the previous
                    step's `present` tensors (every step's logits against the full forward's)
  runtime (`--device`)  the packed file through the inference runtime's dense and sparse backends
                    (fused groups, feature-major forward; cuSPARSE on CUDA) in fp32 on that device:
                    max |Δlogits| ≤ 1e-4 for an fp32 file, else the packed file's bound; an int8
                    file's sparse backend on CPU runs the int8 kernels (int8 weights, fp32
                    activations), elsewhere its weights dequantized
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.table import Table

from chtsl_infer.model.modeling import ChtslLlamaForCausalLM

VERIFY_SHAPES: tuple[tuple[int, int], ...] = ((1, 11), (3, 5))  # (batch, seq), ≠ EXPORT_SHAPE
TOL_PACKED_FP32 = 1e-6
TOL_PACKED_REL = 1e-2
TOL_PACKED_INT8 = 5e-2
TOL_ONNX = 1e-4
DTYPE_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "int8"}
CACHED_PROMPT = (2, 7)  # (batch, prompt tokens) of the KV-cache check
DECODE_STEPS = 8


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
    phase: str = "full"  # "full" (whole sequences), "prefill" or "N cached steps" (KV cache)

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


def _tolerance(stored: torch.dtype, fp32: tuple[str, float]) -> tuple[str, float]:
    """(metric, tolerance) for a packed file of value dtype `stored`: `fp32` for float32, else relative."""
    if stored == torch.float32:
        return fp32
    return "rel", TOL_PACKED_INT8 if stored == torch.int8 else TOL_PACKED_REL


def _compare(file: str, runtime: str, ids: torch.Tensor, ref: torch.Tensor, out: torch.Tensor,
             metric: str, tol: float, phase: str = "full") -> Check:
    diff = (out.float() - ref).abs()
    rel = float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(ref).clamp_min(1e-30))
    return Check(file, runtime, (ids.shape[0], ids.shape[1]), float(diff.max()), rel, metric, tol, phase)


@torch.no_grad()
def verify_packed(path: str | Path, batches: list[torch.Tensor], refs: list[torch.Tensor]) -> list[Check]:
    """Reloads the packed file (validated), rebuilds the model in fp32, compares logits."""
    from chtsl_infer.formats.model_dir import load_packed
    from chtsl_infer.formats.packed import unpack_model

    packed = load_packed(path)
    model = unpack_model(packed, torch.float32)
    metric, tol = _tolerance(packed.dtype, ("max_abs", TOL_PACKED_FP32))
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
    from chtsl_infer.formats.model_dir import WEIGHTS_NAME, load_packed
    from chtsl_infer.runtime.backends import load_runtime

    stored = load_packed(Path(directory) / WEIGHTS_NAME).dtype
    metric, tol = _tolerance(stored, ("max_abs", TOL_ONNX))
    device = torch.device(device)
    checks = []
    for backend in ("dense", "sparse"):
        int8 = stored == torch.int8 and backend == "sparse" and device.type == "cpu"
        rt = load_runtime(directory, backend, device, torch.int8 if int8 else torch.float32)
        for ids, ref in zip(batches, refs, strict=True):
            checks.append(_compare("packed", f"runtime {backend} {device.type}", ids, ref, rt.logits(ids).cpu(),
                                   metric, tol))
        del rt
    return checks


def verify_onnx(path: str | Path, batches: list[torch.Tensor], refs: list[torch.Tensor]) -> list[Check]:
    """Runs the ONNX file in ONNX Runtime on every available provider (CPU, CUDA), compares logits.

    Whole sequences: a graph with `past_key_values` inputs gets an empty cache (past_seq = 0).
    """
    from chtsl_infer.runtime.backends import OnnxCache
    from export.onnx import providers, session

    checks = []
    for provider in providers():
        sess = session(path, provider)
        cached = OnnxCache.has_cache(sess)
        for ids, ref in zip(batches, refs, strict=True):
            if cached:
                logits = OnnxCache.empty(sess, ids.shape[0]).run(sess, ids)
            else:
                logits = torch.from_numpy(sess.run(["logits"], {"input_ids": ids.numpy()})[0])
            name = provider.removesuffix("ExecutionProvider")
            checks.append(_compare("onnx", f"ORT {name}", ids, ref, logits, "max_abs", TOL_ONNX))
    return checks


def cached_batch(vocab_size: int, seed: int = 1) -> torch.Tensor:
    """Random ids (batch, prompt + DECODE_STEPS) for `verify_onnx_cached`."""
    batch, prompt = CACHED_PROMPT
    return random_batches(vocab_size, ((batch, prompt + DECODE_STEPS),), seed)[0]


def verify_onnx_cached(path: str | Path, ids: torch.Tensor, ref: torch.Tensor,
                       prompt: int = CACHED_PROMPT[1]) -> list[Check]:
    """The KV cache of the ONNX graph against the full forward's logits `ref` (batch, seq, vocab).

    Per provider: a prefill of ids[:, :prompt] from an empty cache (all its positions' logits), then
    one token per step, each fed the previous step's `present` tensors as `past_key_values`; the
    steps' logits are checked together. One `Check` for the prefill, one for the steps.
    """
    from chtsl_infer.runtime.backends import OnnxCache
    from export.onnx import providers, session

    checks = []
    for provider in providers():
        sess = session(path, provider)
        name = f"ORT {provider.removesuffix('ExecutionProvider')}"
        if not OnnxCache.has_cache(sess):
            raise ValueError(f"{path} has no past_key_values inputs")
        cache = OnnxCache.empty(sess, ids.shape[0])
        prefill = cache.run(sess, ids[:, :prompt])
        checks.append(_compare("onnx", name, ids[:, :prompt], ref[:, :prompt], prefill, "max_abs", TOL_ONNX,
                               "prefill"))
        steps = torch.cat([cache.run(sess, ids[:, t:t + 1]) for t in range(prompt, ids.shape[1])], dim=1)
        n = ids.shape[1] - prompt
        checks.append(_compare("onnx", name, ids[:, prompt:], ref[:, prompt:], steps, "max_abs", TOL_ONNX,
                               f"{n} cached steps"))
    return checks


def checks_table(checks: list[Check]) -> Table:
    """Rich table: file, runtime, shape, max |Δlogits|, relative error, tolerance, verdict."""
    table = Table(title="Verification vs PyTorch (fp32 logits)")
    phases = any(c.phase != "full" for c in checks)  # the column only when the KV cache was checked
    for col in ("export", "runtime", *["phase"] * phases, "shape", "max |Δ|", "rel ‖Δ‖", "tolerance", "ok"):
        table.add_column(col, justify="left" if col in ("export", "runtime", "phase") else "right", no_wrap=True)
    for c in checks:
        tol = f"{'max' if c.metric == 'max_abs' else 'rel'} ≤ {c.tol:.0e}"
        verdict = "[green]yes[/]" if c.ok else "[bold red]FAIL[/]"
        table.add_row(c.file, c.runtime, *[c.phase] * phases, f"{c.shape[0]}×{c.shape[1]}", f"{c.max_abs:.2e}",
                      f"{c.rel:.2e}", tol, verdict)
    return table
