"""`resolve_model_dir`: the one place that decides what a model directory is."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from chtsl_infer.errors import ChtslError
from chtsl_infer.formats.model_dir import resolve_model_dir, save_packed
from chtsl_infer.formats.packed import pack_model
from chtsl_infer.runtime.backends import load_runtime
from tests.conftest import tiny_model


def test_kinds_and_files(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = resolve_model_dir(tiny_checkpoint)
    assert (ckpt.kind, ckpt.onnx_file, ckpt.is_training_checkpoint) == ("checkpoint", None, False)
    assert resolve_model_dir(ckpt) is ckpt

    packed_dir = tmp_path / "packed"
    packed_dir.mkdir()
    model = tiny_model("sltrain", vocab_size=64)
    save_packed(pack_model(model), packed_dir / "model.safetensors")
    packed = resolve_model_dir(packed_dir)
    assert packed.kind == "packed" and packed.onnx_file is None
    assert packed.config().to_dict()["chtsl"] == model.config.to_dict()["chtsl"]  # from the header, no weights

    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", onnx_dir)
    (onnx_dir / "model.onnx").write_bytes(b"graph")
    onnx = resolve_model_dir(onnx_dir)
    assert onnx.kind == "onnx" and onnx.onnx_file == onnx_dir / "model.onnx"
    assert onnx.config().chtsl == ckpt.config().chtsl
    with pytest.raises(ChtslError, match="holds only model.onnx"):
        onnx.require_weights()
    with pytest.raises(ChtslError, match="holds only model.onnx"):
        load_runtime(onnx_dir, "dense")


@pytest.mark.parametrize("setup,match", [
    (lambda d: None, "checkpoint not found: .* is not a directory"),
    (lambda d: d.mkdir(), "not a chtsl checkpoint \\(expected config.json and model.safetensors\\)"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{"), (d / "model.safetensors").write_bytes(b"x")),
     "is not readable JSON"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "llama"}'),
                (d / "model.safetensors").write_bytes(b"x")), "model_type 'llama', expected 'chtsl_llama'"),
])
def test_bad_directories(tmp_path: Path, setup, match: str) -> None:
    path = tmp_path / "m"
    setup(path)
    with pytest.raises(ChtslError, match=match):
        resolve_model_dir(path)
