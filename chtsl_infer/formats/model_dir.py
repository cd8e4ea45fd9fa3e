"""What kind of model directory a path is, decided once per command (docs/formats.md §1–§3).

A directory the toolkit wrote is one of:

- `checkpoint`: a training checkpoint (or any HF-style save of `ChtslLlamaForCausalLM`):
  `config.json` with `model_type` `chtsl_llama` + `model.safetensors` of the training form
  (masked dense S, masks, A, B), optionally `trainer_state/` and the tokenizer;
- `packed`: a `chtsl export` with `model.safetensors` in the packed CSR format (its header says
  `format=chtsl-packed` and carries the config), maybe `model.onnx` beside it;
- `onnx`: a `chtsl export --format onnx`: `model.onnx` + `config.json`, no safetensors weights.

`resolve_model_dir` reads only names and the safetensors header (no weights) and raises
`ChtslError` for anything else; loaders (`checkpoint.load_model`, `runtime.load_runtime`) take
the `ModelDir` it returns, so no command inspects a directory twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from chtsl_infer.errors import ChtslError, first_line

WEIGHTS_NAME = "model.safetensors"
ONNX_NAME = "model.onnx"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
TRAINER_STATE_DIR = "trainer_state"
MODEL_TYPE = "chtsl_llama"
PACKED_FORMAT = "chtsl-packed"

Kind = Literal["checkpoint", "packed", "onnx"]


@dataclass(frozen=True)
class ModelDir:
    """A resolved model directory: its kind and which of the known files it holds."""

    path: Path
    kind: Kind
    packed_metadata: dict[str, str] | None = None  # the packed safetensors header (kind `packed`)

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def onnx_file(self) -> Path | None:
        """`model.onnx` when the directory has one (an ONNX export, or `--format all`)."""
        f = self.path / ONNX_NAME
        return f if f.is_file() else None

    @property
    def has_tokenizer(self) -> bool:
        return (self.path / TOKENIZER_NAME).is_file()

    @property
    def is_training_checkpoint(self) -> bool:
        """A checkpoint the trainer wrote (with `trainer_state/`, so `--resume` and the trainer's
        validation settings are available)."""
        return self.kind == "checkpoint" and (self.path / TRAINER_STATE_DIR / "state.json").is_file()

    def config(self):  # -> ChtslConfig
        """The model's `ChtslConfig`, read without loading any weight (the packed header's config
        for packed exports, `config.json` otherwise)."""
        from chtsl_infer.formats.checkpoint import config_from_dict, read_config

        if self.packed_metadata is not None and "config" in self.packed_metadata:
            try:
                raw = json.loads(self.packed_metadata["config"])
            except json.JSONDecodeError as e:
                raise ChtslError(f"{self.weights}: invalid config in metadata ({first_line(e)})") from None
            return config_from_dict(raw, f"{self.weights}: the config in its metadata")
        return read_config(self.path / CONFIG_NAME)

    def require_weights(self) -> ModelDir:
        """`self` when it holds safetensors weights (a checkpoint or a packed export); ChtslError
        for an ONNX-only export (only the `onnx` backend can run it)."""
        if self.kind == "onnx":
            raise ChtslError(f"{self.path} is not a chtsl checkpoint (expected {CONFIG_NAME} and {WEIGHTS_NAME}; "
                             f"it holds only {ONNX_NAME}: use --backend onnx)")
        return self

    def require_onnx(self) -> Path:
        """The ONNX graph; ChtslError naming the command that makes one when there is none."""
        if self.onnx_file is None:
            raise ChtslError(f"{self.path} has no {ONNX_NAME}; run `chtsl export {self.path} --format onnx` first")
        return self.onnx_file


def packed_metadata(weights: Path) -> dict[str, str] | None:
    """The safetensors header metadata of `weights` when it is a packed export; None otherwise
    (missing, unreadable or not packed: the loader that needs it reports why)."""
    if not weights.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # noqa: BLE001 - any unreadable file is "not packed"
        return None
    return metadata if metadata.get("format") == PACKED_FORMAT else None


def _check_checkpoint(p: Path) -> None:
    config = p / CONFIG_NAME
    if not config.is_file() or not (p / WEIGHTS_NAME).is_file():
        raise ChtslError(f"{p} is not a chtsl checkpoint (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        raise ChtslError(f"{config} is not readable JSON ({first_line(e)})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != MODEL_TYPE:
        raise ChtslError(f"{p} is not a chtsl checkpoint (model_type {model_type!r}, expected {MODEL_TYPE!r})")


def resolve_model_dir(path: str | Path | ModelDir) -> ModelDir:
    """The `ModelDir` of `path` (a `ModelDir` passes through); ChtslError when `path` is not a
    directory or not one of the three kinds."""
    if isinstance(path, ModelDir):
        return path
    p = Path(path)
    if not p.is_dir():
        raise ChtslError(f"checkpoint not found: {p} is not a directory")
    metadata = packed_metadata(p / WEIGHTS_NAME)
    if metadata is not None:
        return ModelDir(p, "packed", metadata)
    if not (p / WEIGHTS_NAME).exists() and (p / ONNX_NAME).is_file() and (p / CONFIG_NAME).is_file():
        return ModelDir(p, "onnx")
    _check_checkpoint(p)
    return ModelDir(p, "checkpoint")


