"""`chtsl bench` and `chtsl generate` through the CLI on tiny models (smoke + bad input)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from chtsl_infer import kernels
from chtsl_infer.cli import main
from chtsl_infer.commands.bench import add_limits
from chtsl_infer.model.presets import build_config
from chtsl_infer.runtime.backends import DENSE_PATHS, random_packed
from tests.conftest import expected_flops, expected_linear_bytes


def _run(*args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    code = "import sys; from chtsl_infer.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "COLUMNS": str(columns), "PATH": "/usr/bin:/bin",
                               "CHTSL_TUNE": "0"})  # the defaults, as in the test process (conftest)


def _check_machine(machine: dict, decode: bool) -> None:
    """The JSON's `machine` block: present and typed; the limit of the mode measured."""
    assert isinstance(machine["cpu_model"], str) and machine["cpu_model"]
    assert isinstance(machine["cpu_flags"], list) and all(isinstance(f, str) for f in machine["cpu_flags"])
    assert isinstance(machine["threads"], int) and machine["threads"] >= 1
    assert machine["llc_bytes"] is None or isinstance(machine["llc_bytes"], int)
    assert machine["dense_path"] in DENSE_PATHS
    assert isinstance(machine["dense_path_s"], dict) and all(t > 0 for t in machine["dense_path_s"].values())
    if machine["dense_path_s"]:  # timed over the tiny model's blocks (it fits in any cache: all of them)
        assert machine["dense_path_blocks"] == build_config("tiny").num_hidden_layers
    if decode:
        assert machine["stream_buffer_bytes"] >= 4 * (machine["llc_bytes"] or 0)
        assert machine["stream_read_gbps"] == max(machine["stream_read_by_reader_gbps"].values()) > 0
    else:
        assert machine["gemm_gflops"] > 0 and all(isinstance(n, int) for n in machine["gemm_shape"])


def _expected_decode_bytes(method: str, backend: str, batch: int, prompt: int, new: int) -> float:
    """Bytes per decoded token of the tiny preset's random model (the worker's seed), counted from the
    packed tensors: the groups, norms, lm_head, one embedding row per sequence, the KV cache at the mean
    attended position."""
    cfg = build_config("tiny", method=method, s_total=0.9)
    packed = random_packed(cfg, seed=0)
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    kv_per_position = layers * 2 * batch * cfg.num_key_value_heads * (hidden // cfg.num_attention_heads) * 4
    mean_attended = sum(prompt + i + 1 for i in range(new)) / new
    step = (expected_linear_bytes(packed, backend, 4) + (2 * layers + 1) * hidden * 4 + cfg.vocab_size * hidden * 4
            + batch * hidden * 4 + kv_per_position * mean_attended)
    return step / batch


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
    _check_machine(report["machine"], decode=False)
    assert report["machine"]["dense_path"] == "torch" and report["machine"]["gemm_shape"][2] == 32  # 2 × 16 tokens
    for r, (method, backend) in zip(rows, [("dense", "dense"), ("chtsl", "sparse"), ("cola", "dense")], strict=True):
        cfg = build_config("tiny", method=method, s_total=0.9)
        assert r["flops_per_token"] == expected_flops(random_packed(cfg, seed=0), backend)
        assert r["gflops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 1e9)
        assert r["gemm_fraction"] == pytest.approx(r["gflops"] / report["machine"]["gemm_gflops"])
        assert r["flop_bound"] == pytest.approx(base["flops_per_token"] / r["flops_per_token"])
    assert [r["dense_path"] for r in rows] == ["torch", None, None]  # cola and sparse have no dense weight
    assert "GFLOP/s" in proc.stdout and "dense GEMM" in proc.stdout
    # Peak tensor memory is deterministic: the sparse model's is below dense's by its resident saving.
    saved = rows[0]["peak_tensor_bytes"] - rows[1]["peak_tensor_bytes"]
    assert rows[0]["peak_tensor_bytes"] > rows[0]["model_bytes"]
    assert saved >= 0.9 * (rows[0]["model_bytes"] - rows[1]["model_bytes"])


@pytest.mark.slow  # spawns one benchmark worker per configuration
def test_bench_decode_reports_prefill_decode_and_latency(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    proc = _run("bench", "--mode", "decode", "--preset", "tiny", "--batch", "2", "--prompt-len", "12",
                "--new-tokens", "5", "--steps", "2", "--backend", "sparse", "--json", str(out), columns=80)
    assert proc.returncode == 0, proc.stderr
    assert "decode/s" in proc.stdout and "p90 ms" in proc.stdout and "MB/token" in proc.stdout
    assert max(map(len, proc.stdout.splitlines())) <= 80 and "…" not in proc.stdout  # untruncated in 80 columns
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
        assert r["bytes_per_token"] == pytest.approx(_expected_decode_bytes(r["method"], r["backend"], 2, 12, 5))
        assert r["bytes_per_token"] == pytest.approx(sum(r["bytes_parts"].values()) / 2)
        assert r["effective_gbps"] == pytest.approx(r["bytes_per_token"] * r["tokens_per_s"] / 1e9)
        assert r["stream_fraction"] == pytest.approx(r["effective_gbps"] / report["machine"]["stream_read_gbps"])
        assert r["byte_bound"] == pytest.approx(base["bytes_per_token"] / r["bytes_per_token"])
        assert isinstance(r["above_bound"], bool)
    assert rows[1]["model_memory_ratio"] < 0.75
    _check_machine(report["machine"], decode=True)
    assert report["settings"]["dense_path"] == "auto"  # measured: both paths apply at 2 tokens per step
    assert rows[0]["dense_path"] == report["machine"]["dense_path"] and rows[1]["dense_path"] is None
    if kernels.cpu_kernel_status()[0]:
        assert set(report["machine"]["dense_path_s"]) == set(DENSE_PATHS)


@pytest.mark.slow  # spawns one benchmark worker per configuration
def test_bench_decode_int8(tmp_path: Path) -> None:
    """`--dtype int8`: the preset model's int8 weights (quantized in memory) against the dense fp32 baseline,
    resident in about a quarter of the fp32 sparse model's bytes."""
    out = tmp_path / "int8.json"
    proc = _run("bench", "--mode", "decode", "--preset", "tiny", "--batch", "1", "--prompt-len", "8",
                "--new-tokens", "4", "--steps", "1", "--backend", "sparse", "--dtype", "int8", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["settings"]["dtype"] == "int8"
    base, row = report["results"]
    assert base["model"] == "dense (baseline)" and row["backend"] == "sparse" and row["tokens_per_s"] > 0
    fp32 = json.loads(_run_json(tmp_path, "bench", "--mode", "decode", "--preset", "tiny", "--batch", "1",
                                "--prompt-len", "8", "--new-tokens", "4", "--steps", "1", "--backend", "sparse"))
    assert row["model_bytes"] < 0.5 * fp32["results"][1]["model_bytes"]
    assert base["model_bytes"] == fp32["results"][0]["model_bytes"]  # the same dense fp32 baseline
    if kernels.cpu_kernel_status()[0]:  # its dense paths timed in fp32, as for an fp32 run
        assert set(report["machine"]["dense_path_s"]) == set(fp32["machine"]["dense_path_s"]) == set(DENSE_PATHS)
    a8 = json.loads(_run_json(tmp_path, "bench", "--mode", "decode", "--preset", "tiny", "--batch", "1",
                              "--prompt-len", "8", "--new-tokens", "4", "--steps", "1", "--backend", "sparse",
                              "--dtype", "int8", "--int8-activations"))
    row = a8["results"][1]
    assert row["label"].endswith("[sparse a8]") and row["int8_activations"] is True
    assert row["tokens_per_s"] > 0 and row["bytes_per_token"] > 0 and a8["results"][0]["int8_activations"] is False


def _run_json(tmp_path: Path, *argv: str) -> str:
    out = tmp_path / "run.json"
    proc = _run(*argv, "--json", str(out), "--force")
    assert proc.returncode == 0, proc.stderr
    return out.read_text()


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


def _decode_row(model: str, backend: str, tokens_per_s: float, bytes_per_token: float | None) -> dict:
    return {"model": model, "backend": backend, "tokens_per_s": tokens_per_s, "bytes_per_token": bytes_per_token,
            "effective_gbps": None if bytes_per_token is None else bytes_per_token * tokens_per_s / 1e9,
            "dense_path": "gemv" if backend == "dense" else None, "prefill_tokens_per_s": 12_345.0,
            "latency_p50_s": 0.95 / tokens_per_s, "latency_p90_s": 1.2345 / tokens_per_s,
            "peak_memory_bytes": 12_345 << 20, "peak_memory_ratio": 0.123}


def test_limits_flag_a_speedup_above_the_byte_bound() -> None:
    """Bound = the baseline's bytes per token ÷ the row's; above it (beyond 5 %) a row streamed faster
    than the baseline: flagged. An ONNX row has no count: no bound, no flag."""
    rows = [_decode_row("dense (baseline)", "dense", 4.0, 5.0e9), _decode_row("chtsl", "sparse", 23.0, 0.87e9),
            _decode_row("chtsl", "sparse", 24.2, 0.8e9), _decode_row("export", "onnx", 30.0, None)]
    for r in rows:
        r["speedup_vs_dense"] = r["tokens_per_s"] / 4.0
    add_limits(rows, {"stream_read_gbps": 25.0}, decode=True)
    assert [r["byte_bound"] for r in rows] == [1.0, pytest.approx(5.0 / 0.87), pytest.approx(6.25), None]
    assert [r["above_bound"] for r in rows] == [False, False, False, False]  # 5.75 ≤ 5.75; 6.05 ≤ 6.25
    assert rows[1]["stream_fraction"] == pytest.approx(0.87 * 23.0 / 25.0) and rows[3]["stream_fraction"] is None
    rows[2]["speedup_vs_dense"] = 6.25 * 1.06
    add_limits(rows, {"stream_read_gbps": None}, decode=True)
    assert [r["above_bound"] for r in rows] == [False, False, True, False]
    assert rows[0]["stream_fraction"] is None  # no measured bandwidth (CUDA)
    forward = [{"flops_per_token": 2e9, "gflops": 50.0, "speedup_vs_dense": 1.0},
               {"flops_per_token": 0.2e9, "gflops": 40.0, "speedup_vs_dense": 10.6}]
    add_limits(forward, {"gemm_gflops": 100.0}, decode=False)
    assert [r["flop_bound"] for r in forward] == [1.0, pytest.approx(10.0)]
    assert [r["gemm_fraction"] for r in forward] == [0.5, 0.4] and forward[1]["above_bound"]


def test_decode_tables_fit_80_columns_untruncated(monkeypatch: pytest.MonkeyPatch) -> None:
    """1B-sized numbers (a 5 GB model read at 4.6 tokens/s, p90 over a second) and every column: two
    tables of ≤ 80 columns, nothing cut short, and one line naming the row above its bound."""
    from chtsl_infer.commands import bench

    console = Console(width=80, record=True, force_terminal=False)
    monkeypatch.setattr(bench, "console", console)
    rows = [_decode_row("dense (baseline)", "dense", 1.0, 5.1e9), _decode_row("chtsl", "sparse", 6.5, 0.87e9)]
    for r in rows:
        r["speedup_vs_dense"] = r["prefill_speedup_vs_dense"] = r["tokens_per_s"] / 1.0
    add_limits(rows, {"stream_read_gbps": 23.5}, decode=True)
    settings = {"mode": "decode", "ckpt": None, "preset": "llama1b-c4", "s_total": 0.9, "batch": 1, "prompt_len": 128,
                "new_tokens": 64, "device": "cpu", "dtype": "float32", "steps": 1}
    machine = {"cpu_model": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "threads": 2, "stream_read_gbps": 23.5,
               "stream_buffer_bytes": 1 << 30, "dense_path": "gemv", "dense_path_s": {"torch": 0.01, "gemv": 0.008}}
    bench._print_decode_table(rows, settings)
    bench._print_limits(rows, machine, settings)
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    assert "5,100.0" in text and "1,234.5" in text and "12,345" in text  # MB/token, p90 ms, prefill/s, MiB
    assert "suspicious: chtsl [sparse] runs 6.50× dense, above its byte bound 5.86×" in " ".join(text.split())


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
    # int8 weights quantized in memory; an int8 export keeps them by default (auto) on CPU
    proc = _run("generate", str(tiny_checkpoint), "--prompt", "The def statement", "--new-tokens", "6",
                "--backend", "sparse", "--dtype", "int8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The def statement") and "tokens/s (backend sparse, int8)" in proc.stdout
    exported = tmp_path / "int8"
    assert _run("export", str(tiny_checkpoint), "--format", "safetensors", "--dtype", "int8", "--no-verify",
                "--out", str(exported)).returncode == 0
    proc = _run("generate", str(exported), "--prompt", "The def statement", "--new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s (backend sparse, int8)" in proc.stdout
    proc = _run("generate", str(exported), "--prompt", "The def statement", "--new-tokens", "6", "--int8-activations",
                "--json", "-")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["int8_activations"] is True and report["backend"] == "sparse" and report["new_tokens"] > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backend", "fast"], "unknown backend 'fast'"),
        (["--backend", "onnx"], "chtsl export"),
        (["--new-tokens", "0"], "--new-tokens must be positive"),
        (["--max-new-tokens", "0"], "--new-tokens must be positive"),  # the old spelling names the new one
        (["--new-tokens", "100000"], "exceeds the model's"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--dtype", "int4"], "unknown dtype 'int4'"),
        (["--dtype", "int8", "--backend", "onnx"], "use --dtype fp32"),
        (["--dtype", "fp16", "--backend", "sparse"], "computes in float32 or bfloat16"),
        (["--dtype", "bf16", "--backend", "onnx"], "use --dtype fp32"),
        (["--int8-activations"], "--int8-activations needs int8 weights"),  # fp32 by default
        (["--int8-activations", "--dtype", "int8", "--backend", "dense"], "--int8-activations needs int8 weights"),
    ],
)
def test_generate_bad_input(tiny_checkpoint: Path, extra: list[str], message: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tiny_checkpoint), "--prompt", "x", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
