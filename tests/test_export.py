"""`chtsl export` end to end: outputs, verification, and one-line errors with no partial output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chtsl_infer.formats.model_dir import is_packed_dir, load_model, load_packed, load_tokenizer
from chtsl_infer.formats.packed import DTYPES
from tests.conftest import run_cli

IDS = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))


def one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def leftovers(directory: Path) -> list[str]:
    """Hidden temp entries an export may have left in `directory`."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture
def ckpt(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the session checkpoint (the default output goes inside it)."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


@torch.no_grad()
def logits(path: Path) -> torch.Tensor:
    return load_model(path)(input_ids=IDS, use_cache=False).logits


@pytest.mark.slow  # every export format with verification
def test_export_all_to_default_dir(ckpt: Path, tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    code, out, _ = run_cli(["export", str(ckpt), "--json", str(summary)])
    assert code == 0, out
    export = ckpt / "export"
    names = {p.name for p in export.iterdir()}
    assert {"model.safetensors", "model.onnx", "config.json", "tokenizer.json"} <= names
    assert leftovers(ckpt) == [] and leftovers(export) == []
    assert "dense-equivalent size" in out and "Verification" in out

    # The packed export reloads to the checkpoint's logits and carries its tokenizer.
    assert is_packed_dir(export)
    assert (logits(export) - logits(ckpt)).abs().max().item() <= 1e-6
    assert load_tokenizer(export)("x = 1").input_ids == load_tokenizer(ckpt)("x = 1").input_ids

    report = json.loads(summary.read_text())
    assert report["written"] is True
    checks = report["verification"]
    assert {c["file"] for c in checks} == {"packed", "onnx"}
    assert len({tuple(c["shape"]) for c in checks if c["phase"] == "full"}) == 2  # two batch shapes
    # the ONNX KV cache: a prefill and ≥ 8 one-token steps fed the graph's own present tensors
    assert {c["phase"] for c in checks if c["file"] == "onnx"} >= {"prefill", "8 cached steps"}
    assert all(c["ok"] for c in checks)
    assert all(c["max_abs"] <= 1e-4 for c in checks if c["file"] == "onnx")
    assert all(c["max_abs"] <= 1e-6 for c in checks if c["file"] == "packed")
    rows = {r["file"]: r for r in report["files"]}
    assert rows["model.safetensors"]["bytes"] == (export / "model.safetensors").stat().st_size
    assert rows["model.onnx (float32)"]["bytes"] == (export / "model.onnx").stat().st_size
    assert all(0 < r["ratio"] < 1 for r in report["files"])


@pytest.mark.parametrize("flag", ["bf16"])  # fp16 is covered in test_packed.py
def test_half_precision_export(flag: str, ckpt: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(["export", str(ckpt), "--format", "safetensors", "--dtype", flag, "--out", str(out_dir),
                        "--json", str(tmp_path / "s.json")])
    assert code == 0, out
    assert load_packed(out_dir).dtype == DTYPES[{"fp16": "float16", "bf16": "bfloat16"}[flag]]
    assert not (out_dir / "model.onnx").exists()
    checks = json.loads((tmp_path / "s.json").read_text())["verification"]
    assert checks and all(c["metric"] == "rel" and c["rel"] <= 1e-2 and c["ok"] for c in checks)
    ref = logits(ckpt)
    rel = torch.linalg.vector_norm(logits(out_dir) - ref) / torch.linalg.vector_norm(ref)
    assert 0 < rel.item() <= 1e-2


def test_export_drops_auto_map(ckpt: Path, tmp_path: Path) -> None:
    """A checkpoint whose configs name remote code (`auto_map`): the export's config.json and
    tokenizer_config.json carry none (a chtsl model never needs remote code) and keep every other
    key; the other files are copied byte for byte, and the export loads."""
    remote = {"AutoConfig": "remote.Config", "AutoModelForCausalLM": "remote.Model",
              "AutoTokenizer": ["remote.Tokenizer", None]}
    originals = {}
    for name in ("config.json", "tokenizer_config.json"):
        originals[name] = json.loads((ckpt / name).read_text())
        (ckpt / name).write_text(json.dumps({**originals[name], "auto_map": remote}))
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(["export", str(ckpt), "--format", "safetensors", "--out", str(out_dir)])
    assert code == 0, out
    for name, raw in originals.items():
        assert json.loads((out_dir / name).read_text()) == raw, name
    assert (out_dir / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert leftovers(out_dir) == [] and (logits(out_dir) - logits(ckpt)).abs().max().item() <= 1e-6
    assert load_tokenizer(out_dir)("x = 1").input_ids == load_tokenizer(ckpt)("x = 1").input_ids


def test_int8_export(ckpt: Path, tmp_path: Path) -> None:
    """`--dtype int8`: a format-2 file with int8 values and factors, row scales and column deltas, verified
    within 5e-2 (the dequantized model and, with --verify-device cpu, the int8 kernels); the summary
    prints the bytes per link (2 + the row pointers and scales) and per decoded token; `--index absolute`
    picks int16 columns; --format all keeps the ONNX graph float32."""
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(["export", str(ckpt), "--format", "safetensors", "--dtype", "int8", "--verify-device",
                            "cpu", "--out", str(out_dir), "--json", str(tmp_path / "s.json")])
    assert code == 0, out
    packed = load_packed(out_dir)
    assert packed.dtype == torch.int8 and packed.index == "delta8" and packed.metadata["format_version"] == "2"
    report = json.loads((tmp_path / "s.json").read_text())
    checks = report["verification"]
    assert {c["runtime"] for c in checks} == {"torch int8", "runtime dense cpu", "runtime sparse cpu"}
    assert all(c["metric"] == "rel" and 0 < c["rel"] <= 5e-2 and c["ok"] for c in checks)
    row = report["files"][0]
    cost = packed.decode_bytes()
    assert row["bytes_per_link"] == cost["per_link"] and row["bytes_per_token"] == cost["total"]
    sparse = [lin for lin in packed.linears.values() if lin.has_sparse]
    links, rows = sum(lin.nnz for lin in sparse), sum(lin.out_features for lin in sparse)
    assert 2 < row["bytes_per_link"] <= 2 + 9 * rows / links  # + row pointer and scale per (tiny) row
    assert "bytes per link of S" in out and "read per decoded token" in out
    code, out, _ = run_cli(["export", str(ckpt), "--format", "safetensors", "--dtype", "int8", "--index", "absolute",
                            "--no-verify", "--out", str(tmp_path / "abs")])
    assert code == 0, out
    absolute = load_packed(tmp_path / "abs")
    assert absolute.index == "absolute" and all(
        lin.col_indices.dtype == torch.int16 for lin in absolute.linears.values() if lin.has_sparse)
    assert absolute.decode_bytes()["per_link"] == pytest.approx(cost["per_link"] + 1, abs=1e-6)


@pytest.mark.slow  # the ONNX export beside an int8 packed file
def test_int8_export_with_onnx_keeps_the_graph_float(ckpt: Path, tmp_path: Path) -> None:
    code, out, _ = run_cli(["export", str(ckpt), "--dtype", "int8", "--out", str(tmp_path / "out")])
    assert code == 0, out
    assert load_packed(tmp_path / "out").dtype == torch.int8 and (tmp_path / "out" / "model.onnx").is_file()
    assert "the ONNX graph is float32" in out


@pytest.mark.parametrize("flag", ["fp32", "bf16"])
def test_runtime_verification_on_a_device(flag: str, ckpt: Path, tmp_path: Path) -> None:
    """`--verify-device` adds the inference runtime's dense and sparse backends to the checks (CPU here;
    the GPU check runs it with `--verify-device cuda`)."""
    code, out, _ = run_cli(["export", str(ckpt), "--format", "safetensors", "--dtype", flag, "--verify-device", "cpu",
                            "--out", str(tmp_path / "out"), "--json", str(tmp_path / "s.json")])
    assert code == 0, out
    checks = json.loads((tmp_path / "s.json").read_text())["verification"]
    runtime = [c for c in checks if c["runtime"].startswith("runtime")]
    assert sorted({c["runtime"] for c in runtime}) == ["runtime dense cpu", "runtime sparse cpu"]
    assert len(runtime) == 4 and all(c["ok"] for c in runtime)
    if flag == "fp32":
        assert all(c["metric"] == "max_abs" and c["max_abs"] <= 1e-4 for c in runtime)
    else:  # bf16 values: the packed file's relative bound, and the rounding is visible
        assert all(c["metric"] == "rel" and 0 < c["rel"] <= 1e-2 for c in runtime)


def test_existing_output_needs_force(ckpt: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, _, err = run_cli(["export", str(ckpt), "--format", "safetensors", "--out", str(out_dir)])
    assert code == 2
    one_line_error(err, str(out_dir), "--force")
    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"]

    # --force replaces only a previous export, never a directory of other files.
    code, _, err = run_cli(["export", str(ckpt), "--format", "safetensors", "--no-verify", "--out", str(out_dir),
                            "--force"])
    assert code == 2 and (out_dir / "keep.txt").read_text() == "mine"

    export_dir = tmp_path / "export"
    for force in ([], ["--force"]):
        code, out, _ = run_cli(["export", str(ckpt), "--format", "safetensors", "--no-verify",
                                "--out", str(export_dir), *force])
        assert code == 0, out
    assert (export_dir / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--format", "tflite"], "unknown format"),
        (["--dtype", "int4"], "unknown dtype"),
        (["--dtype", "int8", "--format", "onnx"], "the ONNX graph stays float32"),
        (["--index", "delta4"], "unknown --index 'delta4'"),
        (["--opset", "17"], "opset must be >= 18"),
        (["--verify-device", "tpu"], "unknown --verify-device 'tpu'"),
        (["--device", "tpu"], "unknown --verify-device 'tpu'"),  # the old spelling, read as the new one
        (["--verify-device", "cpu", "--no-verify"], "--verify-device verifies the packed safetensors"),
        (["--verify-device", "cpu", "--format", "onnx"], "--verify-device verifies the packed safetensors"),
        *([(["--verify-device", "cuda"], "CUDA is not available")] if not torch.cuda.is_available() else []),
    ],
)
def test_bad_options(args: list[str], fragment: str, ckpt: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    code, _, err = run_cli(["export", str(ckpt), "--out", str(out_dir), *args])
    assert code == 2
    one_line_error(err, fragment)
    assert not out_dir.exists() and leftovers(tmp_path) == []


def test_not_a_checkpoint(tmp_path: Path) -> None:
    code, _, err = run_cli(["export", str(tmp_path / "nowhere")])
    assert code == 2
    one_line_error(err, "not a directory")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["export", str(tmp_path / "empty")])
    assert code == 2
    one_line_error(err, "not a chtsl checkpoint")
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_checkpoint(damage: str, ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"\x07junk" * 1000)
    code, _, err = run_cli(["export", str(ckpt), "--format", "safetensors"])
    assert code == 2
    one_line_error(err, str(ckpt))
    assert not (ckpt / "export").exists() and leftovers(ckpt) == []


def test_unwritable_output(ckpt: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run_cli(["export", str(ckpt), "--format", "safetensors", "--out", str(blocker / "out")])
    assert code == 2
    one_line_error(err, "cannot write")

    code, _, err = run_cli(["export", str(ckpt), "--out", str(ckpt), "--force"])
    assert code == 2
    one_line_error(err, "would overwrite the checkpoint")
    assert (ckpt / "model.safetensors").is_file()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(ckpt: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_cli(["export", str(ckpt), "--format", "safetensors", "--out", str(locked / "out")])
    finally:
        locked.chmod(0o700)
    assert code == 2
    one_line_error(err, "cannot write")
    assert list(locked.iterdir()) == []


def test_failed_verification_exits_1_and_writes_nothing(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    import export.verify

    monkeypatch.setattr(export.verify, "TOL_PACKED_FP32", -1.0)  # no result can pass
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(["export", str(ckpt), "--format", "safetensors", "--out", str(out_dir)])
    assert code == 1
    assert "FAIL" in out and "verification failed" in out
    assert not out_dir.exists() and leftovers(tmp_path) == []


@pytest.mark.slow  # CLI subprocesses
def test_cli_subprocess_reports_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "chtsl_infer.cli", "export", str(tmp_path / "missing")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120,
    )
    assert proc.returncode == 2
    one_line_error(proc.stderr, "checkpoint not found")
