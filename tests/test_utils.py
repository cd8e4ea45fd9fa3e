"""The shared helpers: the library error, its one-line form, atomic writes, the device resolver."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chtsl_infer.cli import main
from chtsl_infer.errors import ChtslError, first_line
from chtsl_infer.utils import atomic_path, atomic_write_text, backup_path, make_temp_dir, publish_dir, resolve_device


def test_chtsl_error_is_a_value_error_and_first_line() -> None:
    assert issubclass(ChtslError, ValueError)
    assert first_line(RuntimeError("\n  head line\nsecond\nthird")) == "head line"
    assert first_line(KeyError()) == "KeyError"


def test_atomic_path_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".json"
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_publish_dir_swaps_whole_directories(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    for version in ("v1", "v2"):
        tmp = make_temp_dir(target)
        (tmp / "weights").write_text(version)
        publish_dir(tmp, target)
        assert (target / "weights").read_text() == version and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and not backup_path(target).exists()


def test_resolve_device() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ChtslError, match="unknown --device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ChtslError, match="no CUDA device"):
            resolve_device("cuda:0")
    else:
        assert resolve_device("cuda", local_rank=1) == "cuda:1"


def test_cli_turns_library_errors_into_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["info", "--preset", "nope"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: unknown preset 'nope'") and err.count("\n") == 1


def test_cache_dir_reads_the_new_name_and_the_old_one_with_a_warning(monkeypatch, tmp_path, capsys) -> None:
    from chtsl_infer import utils

    monkeypatch.delenv("CHTSL_CACHE", raising=False)
    monkeypatch.setenv("CHTSL_CACHE_DIR", str(tmp_path / "new"))
    assert utils.cache_dir() == tmp_path / "new" and capsys.readouterr().err == ""
    monkeypatch.delenv("CHTSL_CACHE_DIR")
    monkeypatch.setenv("CHTSL_CACHE", str(tmp_path / "old"))
    utils.warn_once.cache_clear()
    assert utils.cache_dir() == tmp_path / "old"
    assert capsys.readouterr().err == "warning: CHTSL_CACHE is deprecated; set CHTSL_CACHE_DIR instead\n"
    monkeypatch.delenv("CHTSL_CACHE")
    assert utils.cache_dir() == Path.home() / ".cache" / "chtsl"


def test_one_dtype_vocabulary() -> None:
    from chtsl_infer.utils import parse_dtype, torch_dtype

    assert [parse_dtype(v) for v in ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16")] == [
        "fp32", "bf16", "fp16", "fp32", "bf16", "fp16"]
    assert parse_dtype("auto", ("auto", "fp32")) == "auto" and torch_dtype("bf16") == torch.bfloat16
    with pytest.raises(ChtslError, match="unknown dtype 'int8'; valid: fp32, bf16, fp16"):
        parse_dtype("int8")
    with pytest.raises(ChtslError, match="valid: auto, fp32, bf16"):
        parse_dtype("fp16", ("auto", "fp32", "bf16"))


def test_inference_dtype_with_int8_weights() -> None:
    """`int8` (int8 weights, fp32 activations) is an inference and export dtype, not a compute dtype of
    training; `auto` keeps an int8 export's weights on CPU and computes in bf16 on CUDA."""
    from chtsl_infer.utils import PACKED_DTYPES, inference_dtype, parse_dtype, torch_dtype

    assert parse_dtype("int8", PACKED_DTYPES) == "int8" and torch_dtype("int8") == torch.int8
    assert inference_dtype("int8", "cpu") == "int8" and inference_dtype("auto", "cpu") == "fp32"
    assert inference_dtype("auto", "cpu", "int8") == "int8" and inference_dtype("auto", "cpu", "bfloat16") == "fp32"
    assert inference_dtype("auto", "cuda:0", "int8") == "bf16" and inference_dtype("fp32", "cpu", "int8") == "fp32"
    with pytest.raises(ChtslError, match="unknown dtype 'int4'"):
        inference_dtype("int4", "cpu")
