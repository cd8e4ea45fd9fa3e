"""`chtsl bench` and `chtsl generate` through the CLI on tiny models (smoke + bad input)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chtsl_infer.cli import main


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from chtsl_infer.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PATH": "/usr/bin:/bin"})


@pytest.mark.slow  # spawns one benchmark worker per configuration
def test_bench_tiny_reports_ratios_to_dense(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _run("bench", "--preset", "tiny", "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1",
                "--backend", "sparse", "--compare", "cola", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stdout and "dense (baseline)" in proc.stdout
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(r["model"], r["backend"]) for r in rows] == [
        ("dense (baseline)", "dense"), ("chtsl", "sparse"), ("cola", "dense")]
    assert report["settings"]["batch"] == 2 and report["settings"]["seq"] == 16
    info = report["kernels"]  # which CPU kernels every number used (CI has a compiler: test_kernels)
    assert info["available"] and info["path"].endswith(".so") and info["flags"][0] == "-O3"
    assert info["tile_vw"] in (8, 16) and info["settings"]["decode_item_bytes"] == 64 << 10
    base = rows[0]
    assert base["speedup_vs_dense"] == 1.0 and base["peak_memory_ratio"] == 1.0
    for r in rows:
        assert r["tokens_per_s"] > 0 and len(r["step_s"]) == 2 and r["peak_memory_bytes"] > 2**20
        assert r["speedup_vs_dense"] == pytest.approx(r["tokens_per_s"] / base["tokens_per_s"])
    # the sparse model's resident size is its packed size: well under the dense model's
    assert rows[1]["model_memory_ratio"] < 0.75
    # Peak tensor memory is deterministic: the sparse model's is below dense's by its resident saving.
    saved = rows[0]["peak_tensor_bytes"] - rows[1]["peak_tensor_bytes"]
    assert rows[0]["peak_tensor_bytes"] > rows[0]["model_bytes"]
    assert saved >= 0.9 * (rows[0]["model_bytes"] - rows[1]["model_bytes"])


@pytest.mark.slow  # spawns one benchmark worker per configuration
def test_bench_decode_reports_prefill_decode_and_latency(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    proc = _run("bench", "--mode", "decode", "--preset", "tiny", "--batch", "2", "--prompt-len", "12",
                "--new-tokens", "5", "--steps", "2", "--backend", "sparse", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "decode tok/s" in proc.stdout and "p90 ms" in proc.stdout
    report = json.loads(out.read_text())
    assert report["settings"]["mode"] == "decode" and report["settings"]["prompt_len"] == 12
    rows = report["results"]
    assert [(r["model"], r["backend"]) for r in rows] == [("dense (baseline)", "dense"), ("chtsl", "sparse")]
    base = rows[0]
    for r in rows:
        assert len(r["prefill_s"]) == 2 and len(r["decode_s"]) == 2
        assert r["tokens_per_s"] == pytest.approx(2 * 5 / (sum(r["decode_s"]) / 2))  # median of two = mean
        assert r["prefill_tokens_per_s"] == pytest.approx(2 * 12 / (sum(r["prefill_s"]) / 2))
        assert 0 < r["latency_p50_s"] <= r["latency_p90_s"]
        assert r["speedup_vs_dense"] == pytest.approx(r["tokens_per_s"] / base["tokens_per_s"])
        assert r["prefill_speedup_vs_dense"] == pytest.approx(r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"])
        assert r["peak_tensor_bytes"] > r["model_bytes"]
    assert rows[1]["model_memory_ratio"] < 0.75


def test_decode_run_feeds_greedy_tokens() -> None:
    """The benchmark decodes what `Runtime.generate` decodes (greedy, one token per step)."""
    from chtsl_infer.commands.bench import decode_run
    from chtsl_infer.runtime.backends import from_packed, random_packed
    from tests.conftest import tiny_config

    rt = from_packed(random_packed(tiny_config("chtsl")), "sparse")
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    prefill, steps, tokens = decode_run(rt, ids, 6, torch.device("cpu"))
    assert prefill > 0 and len(steps) == 6
    assert torch.equal(tokens, rt.generate(ids, 6)[:, 7:])


@pytest.mark.slow  # CLI bench of a trained checkpoint, worker processes
def test_bench_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt.json"
    proc = _run("bench", str(tiny_checkpoint), "--batch", "1", "--seq", "8", "--steps", "1", "--warmup", "0",
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert rows[0]["model"] == "dense (baseline)" and rows[1]["backend"] == "sparse"  # auto → sparse on CPU


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "--batch", "0"], "--batch must be positive"),
        (["bench", "--preset", "tiny", "--backend", "fast"], "unknown backend 'fast'"),
        (["bench", "/no/such/ckpt"], "checkpoint not found"),
        (["bench", "--preset", "huge"], "unknown preset"),
        (["bench", "--preset", "tiny", "--backend", "onnx"], "needs an export directory"),
        (["bench", "--preset", "tiny", "--dtype", "float16", "--backend", "sparse", "--device", "cpu"], "bfloat16"),
        (["bench", "x", "--dtype", "bfloat16", "--mode", "decode", "--backend", "onnx"], "float32 graph"),
        (["bench", "--preset", "tiny", "--compare", "dense,magic"], "unknown method 'magic'"),
        (["bench", "--preset", "tiny", "--mode", "stream"], "unknown mode 'stream'"),
        (["bench", "--preset", "tiny", "--mode", "decode", "--new-tokens", "0"], "--new-tokens must be positive"),
        (["bench", "--preset", "tiny", "--mode", "decode", "--prompt-len", "-3"], "--prompt-len must be positive"),
        (["bench", "--preset", "tiny", "--mode", "decode", "--prompt-len", "1000", "--new-tokens", "100"],
         "exceeds the model's"),
        (["bench", "--preset", "tiny", "--seq", "100000"], "exceeds the model's"),
        (["generate", "/no/such/ckpt", "--prompt", "hi"], "checkpoint not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_bench_cuda_unavailable_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "--preset", "tiny", "--device", "cuda"])
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow  # trains and generates through the CLI
def test_generate_streams_text_and_reports_speed(tiny_checkpoint: Path, tmp_path: Path) -> None:
    proc = _run("generate", str(tiny_checkpoint), "--prompt", "The def statement", "--new-tokens", "6",
                "--backend", "sparse", "--json", str(tmp_path / "gen.json"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The def statement")
    assert "tokens/s (backend sparse, fp32)" in proc.stdout
    report = json.loads((tmp_path / "gen.json").read_text())
    assert 1 <= report["new_tokens"] <= 6 and report["prompt_tokens"] >= 1
    assert report["tokens_per_s"] == pytest.approx(report["new_tokens"] / report["seconds"])
    assert (report["backend"], report["device"], report["dtype"]) == ("sparse", "cpu", "fp32")
    assert report["text"].strip() in proc.stdout  # the continuation that was streamed
    # --json -: stdout is the JSON alone (greedy: the same continuation), the streamed text goes to stderr
    proc = _run("generate", str(tiny_checkpoint), "--prompt", "The def statement", "--max-new-tokens", "6",
                "--backend", "sparse", "--json", "-")  # the old spelling of --new-tokens still parses
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] == report["text"] and proc.stderr.startswith("The def statement")
    proc = _run("generate", str(tiny_checkpoint), "--prompt", "The def statement", "--new-tokens", "6",
                "--backend", "sparse", "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The def statement") and "tokens/s (backend sparse, bf16)" in proc.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backend", "fast"], "unknown backend 'fast'"),
        (["--backend", "onnx"], "chtsl export"),
        (["--new-tokens", "0"], "--new-tokens must be positive"),
        (["--max-new-tokens", "0"], "--new-tokens must be positive"),  # the old spelling names the new one
        (["--new-tokens", "100000"], "exceeds the model's"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--dtype", "fp16", "--backend", "sparse"], "computes in float32 or bfloat16"),
        (["--dtype", "bf16", "--backend", "onnx"], "use --dtype fp32"),
    ],
)
def test_generate_bad_input(tiny_checkpoint: Path, extra: list[str], message: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tiny_checkpoint), "--prompt", "x", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
