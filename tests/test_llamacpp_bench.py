"""benchmarks/llamacpp.py: its GGUF writer (read back with gguf's own reader, values decoded here from
the GGML block layouts) and its llama.cpp glue with a stand-in llama-bench; llama.cpp itself is not
needed (the comparison is not run by CI)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")  # in the dev extra; a bare install skips

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("llamacpp_bench", ROOT / "benchmarks" / "llamacpp.py")
llamacpp = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = llamacpp  # dataclasses look their module up
_spec.loader.exec_module(llamacpp)

# GQA (2 KV heads of 4), a vocabulary with the 256 byte tokens, FFN 96 = 3 blocks of 32
SHAPE = llamacpp.GgufShape(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                           num_kv_heads=2, context_length=64, rms_norm_eps=1e-5, rope_theta=10000.0)


def _source(shape) -> dict[str, np.ndarray]:
    """Every tensor of `shape`: weights with a spread of magnitudes (blocks of tiny and large values,
    exact zeros), norms around 1."""
    rng = np.random.default_rng(7)
    out = {}
    for name, s in shape.tensors():
        x = rng.standard_normal(s).astype(np.float32)
        if len(s) == 2:
            x *= np.exp(rng.uniform(-6, 2, size=(s[0], 1))).astype(np.float32)  # row scales from 2e-3 to 7
            x[0, :32] = 0  # an all-zero block: scale 0
        else:
            x = 1 + 0.1 * x
        out[name] = x
    return out


def _write(tmp_path: Path, file_type: str, shape=SHAPE):
    src = _source(shape)
    path = tmp_path / f"m-{file_type}.gguf"
    stored = llamacpp.write_gguf(path, shape, file_type, lambda i, name, s: src[name])
    return path, src, stored


def _decode(t) -> np.ndarray:
    """A tensor's float32 values from its raw bytes, per the GGML layouts (not gguf.quants)."""
    rows, cols = (int(d) for d in t.shape[::-1]) if len(t.shape) == 2 else (1, int(t.shape[0]))
    raw = np.asarray(t.data).reshape(rows, -1).view(np.uint8)
    qt = gguf.GGMLQuantizationType
    if t.tensor_type == qt.F32:
        return raw.view(np.float32).reshape(rows, cols)
    if t.tensor_type == qt.F16:
        return raw.view(np.float16).astype(np.float32).reshape(rows, cols)
    if t.tensor_type == qt.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(rows, cols)
    if t.tensor_type == qt.Q8_0:  # blocks: fp16 scale, 32 int8
        blocks = raw.reshape(rows, cols // 32, 34)
        d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
        return (d * blocks[..., 2:].view(np.int8).astype(np.float32)).reshape(rows, cols)
    if t.tensor_type == qt.Q4_0:  # blocks: fp16 scale, 16 bytes: low nibbles = values 0-15, high = 16-31
        blocks = raw.reshape(rows, cols // 32, 18)
        d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
        q = np.concatenate([blocks[..., 2:] & 0x0F, blocks[..., 2:] >> 4], axis=-1).astype(np.float32) - 8
        return (d * q).reshape(rows, cols)
    raise AssertionError(f"unexpected type {t.tensor_type!r}")


def _bound(x: np.ndarray, type_name: str) -> np.ndarray:
    """The largest |decoded − source| each value's type allows (round to nearest; the blocks' fp16
    scale adds its own rounding): F16 2⁻¹¹ and BF16 2⁻⁸ relative; Q8_0 half a step of amax/127;
    Q4_0 one step of amax/8 (the value opposite the block's extreme clips from +8 to +7)."""
    if type_name == "F32":
        return np.zeros_like(x)
    if type_name in ("F16", "BF16"):
        return np.abs(x) * 2.0 ** (-11 if type_name == "F16" else -8) + 1e-7
    amax = np.abs(x.reshape(x.shape[0], -1, 32)).max(-1, keepdims=True)
    step = amax / 127 if type_name == "Q8_0" else amax / 8
    q = 127 if type_name == "Q8_0" else 8  # |q| · the scale's fp16 rounding
    bound = step * (0.5 if type_name == "Q8_0" else 1.0) + q * step * 2.0**-11 + 1e-8
    return np.broadcast_to(bound, x.reshape(x.shape[0], -1, 32).shape).reshape(x.shape)


@pytest.mark.parametrize("file_type", llamacpp.GGUF_TYPES)
def test_gguf_round_trip_values_within_the_type_bound(tmp_path, file_type) -> None:
    path, src, stored = _write(tmp_path, file_type)
    reader = gguf.GGUFReader(path)
    assert [t.name for t in reader.tensors] == [n for n, _ in SHAPE.tensors()]
    for t in reader.tensors:
        x = src[t.name]
        assert tuple(int(d) for d in t.shape) == x.shape[::-1]  # GGUF: ne[0] (the row) first
        want = "F32" if x.ndim == 1 else file_type
        assert t.tensor_type.name == want == stored[t.name]
        got = _decode(t).reshape(x.shape)
        err = np.abs(got - x)
        assert (err <= _bound(x, want)).all(), (t.name, float(err.max()))
        if want != "F32":  # the bound is not so loose that a wrong value passes
            assert err.max() > 0


def test_gguf_metadata_for_llama(tmp_path) -> None:
    path, _, _ = _write(tmp_path, "Q8_0")
    f = gguf.GGUFReader(path).fields
    want = {
        "general.architecture": "llama", "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
        "llama.context_length": 64, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": 96, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16, "llama.vocab_size": 300, "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }
    for key, value in want.items():
        assert f[key].contents() == value, key
    assert f["llama.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(1e-5)
    assert f["llama.rope.freq_base"].contents() == pytest.approx(10000.0)
    tokens = f["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == len(set(tokens)) == 300
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and tokens[3 + 0x0A] == "<0x0A>"  # SPM's newline
    types = f["tokenizer.ggml.token_type"].contents()
    assert types[1] == gguf.TokenType.CONTROL and types[3] == gguf.TokenType.BYTE and types[-1] == gguf.TokenType.NORMAL
    assert len(f["tokenizer.ggml.scores"].contents()) == 300
    # the ne (row width first) llama.cpp's llama loader expects of each tensor: hidden 64, KV 2 × 16, FFN 96
    ne = {t.name: tuple(int(d) for d in t.shape) for t in gguf.GGUFReader(path).tensors}
    assert len(ne) == 2 + 2 * 9 + 1
    assert ne["token_embd.weight"] == ne["output.weight"] == (64, 300)
    assert ne["output_norm.weight"] == ne["blk.1.attn_norm.weight"] == ne["blk.1.ffn_norm.weight"] == (64,)
    assert ne["blk.1.attn_q.weight"] == ne["blk.1.attn_output.weight"] == (64, 64)
    assert ne["blk.1.attn_k.weight"] == ne["blk.1.attn_v.weight"] == (64, 32)
    assert ne["blk.1.ffn_gate.weight"] == ne["blk.1.ffn_up.weight"] == (64, 96)
    assert ne["blk.1.ffn_down.weight"] == (96, 64)


def test_rows_not_whole_blocks_are_f16_and_pad_ffn_makes_them_whole(tmp_path) -> None:
    odd = dataclasses.replace(SHAPE, intermediate_size=80)
    _, _, stored = _write(tmp_path, "Q4_0", odd)
    assert stored["blk.0.ffn_down.weight"] == "F16"  # rows of 80 values: 2.5 blocks
    assert stored["blk.0.ffn_gate.weight"] == stored["blk.1.attn_k.weight"] == "Q4_0"
    assert stored["output_norm.weight"] == "F32"
    assert llamacpp.preset_shape("tiny").intermediate_size == 344
    padded = llamacpp.preset_shape("tiny", pad_ffn=True)
    assert padded.intermediate_size == 352 and padded.vocab_size == 4096
    assert llamacpp.preset_shape("llama1b-c4", pad_ffn=True).intermediate_size == 5472


def test_without_llamacpp_one_line_and_exit_0_or_2(monkeypatch, capsys) -> None:
    monkeypatch.setattr(llamacpp, "find_runner", lambda *a: None)
    assert llamacpp.main(["--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "pip install llama-cpp-python" in out
    assert llamacpp.main(["--preset", "tiny", "--require"]) == 2


def test_find_runner(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert llamacpp.find_runner("auto", None, None) == llamacpp.Runner("llama-bench", str(fake))
    assert llamacpp.find_runner("llama-bench", str(tmp_path / "absent"), None) is None
    assert llamacpp.find_runner("python", None, str(tmp_path / "no-python")) is None
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    assert (llamacpp.find_runner("python", None, sys.executable) is not None) == has_llama_cpp


_FAKE_BENCH = """#!{python}
import json, sys
a = sys.argv[1:]
arg = lambda flag: a[a.index(flag) + 1]
with open({log!r}, "a") as f:
    f.write(" ".join(a) + "\\n")
p, n, r = int(arg("-p")), int(arg("-n")), int(arg("-r"))
ts = [100.0 + i for i in range(r)] if n == 0 else [10.0 * (i + 1) for i in range(r)]
print(json.dumps([{{"n_prompt": p, "n_gen": n, "n_depth": int(a[a.index("-d") + 1]) if "-d" in a else 0,
                   "samples_ts": ts, "build_commit": "fake", "n_threads": int(arg("-t"))}}]))
"""


def test_llama_bench_runs_prefill_and_decode_after_the_prompt(tmp_path) -> None:
    log = tmp_path / "calls.txt"
    fake = tmp_path / "llama-bench"
    fake.write_text(_FAKE_BENCH.format(python=sys.executable, log=str(log)))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    settings = {"threads": 3, "repeats": 3, "prompt_len": 128, "new_tokens": 64, "flash_attn": "on", "timeout": 60}
    got = llamacpp.run_llamacpp(llamacpp.Runner("llama-bench", str(fake)), tmp_path / "m.gguf", settings)
    assert got["prefill_tokens_per_s"] == 101.0 and got["tokens_per_s"] == 20.0  # medians
    assert got["llamacpp"]["build_commit"] == "fake" and got["llamacpp"]["n_threads"] == 3
    pp, tg = (line.split() for line in log.read_text().splitlines())
    assert pp[pp.index("-p") + 1] == "128" and pp[pp.index("-n") + 1] == "0" and "-d" not in pp
    assert tg[tg.index("-p") + 1] == "0" and tg[tg.index("-n") + 1] == "64" and tg[tg.index("-d") + 1] == "128"
    for call in (pp, tg):
        assert call[call.index("-t") + 1] == "3" and call[call.index("-fa") + 1] == "on"
        assert call[call.index("-m") + 1] == str(tmp_path / "m.gguf")


@pytest.mark.parametrize("args,message", [
    (["--types", "Q5_K"], "unknown GGUF type 'Q5_K'"),
    (["--chtsl-dtypes", "fp16"], "unknown --chtsl-dtypes 'fp16'"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--prompt-len", "250"], "exceeds the model's 256 positions"),
    (["--repeats", "0"], "--repeats must be positive"),
])
def test_bad_input_is_one_error_line(monkeypatch, capsys, args, message) -> None:
    monkeypatch.setattr(llamacpp, "find_runner", lambda *a: llamacpp.Runner("llama-bench", "/bin/false"))
    assert llamacpp.main(["--preset", "tiny", "--threads", "1", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1



@pytest.mark.slow  # chtsl bench workers
def test_comparison_end_to_end_with_a_stand_in_llama_bench(tmp_path) -> None:
    fake = tmp_path / "llama-bench"
    fake.write_text(_FAKE_BENCH.format(python=sys.executable, log=str(tmp_path / "calls.txt")))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "llamacpp.py"), "--preset", "tiny", "--types", "F16,Q4_0",
         "--pad-ffn", "--llama-bench", str(fake), "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1",
         "--threads", "1", "--gguf-dir", str(tmp_path / "gguf"), "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "llama.cpp Q4_0" in proc.stdout and "chtsl sparse fp32" in proc.stdout
    report = json.loads(out.read_text())
    rows = {f"{r['engine']} {r['weights']}": r for r in report["results"]}
    assert list(rows) == ["llama.cpp F16", "llama.cpp Q4_0", "chtsl dense fp32", "chtsl sparse fp32"]
    sparse = rows["chtsl sparse fp32"]
    assert rows["llama.cpp Q4_0"]["ffn"] == 352 and sparse["ffn"] == 344  # padded for llama.cpp only
    assert rows["llama.cpp Q4_0"]["tokens_per_s"] == 10.0 and rows["llama.cpp Q4_0"]["prefill_tokens_per_s"] == 100.0
    assert rows["llama.cpp Q4_0"]["sparse_over_decode"] == pytest.approx(sparse["tokens_per_s"] / 10.0)
    assert sparse["sparse_over_decode"] == 1.0 and sparse["chtsl_bench"]["backend"] == "sparse"
    assert rows["llama.cpp Q4_0"]["model_bytes"] == Path(rows["llama.cpp Q4_0"]["file"]).stat().st_size
    assert report["settings"]["threads"] == 1 and report["settings"]["gguf_shape"]["intermediate_size"] == 352
