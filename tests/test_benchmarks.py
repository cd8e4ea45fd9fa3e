"""The benchmark scripts run (tiny shapes, one repeat): they import library code that moves."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # child processes that build kernels and models

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_train_step_benchmark_reports_every_configuration(tmp_path) -> None:
    out = tmp_path / "train_step.json"
    _run("train_step.py", "--shapes", "tiny", "--methods", "chtsl,cola", "--sparse-storage", "masked,csr",
         "--steps", "1", "--repeats", "1", "--threads", "1", "--json", str(out))
    rows = json.loads(out.read_text())
    rows = rows["tiny"] if isinstance(rows, dict) else rows
    got = {(r["method"], r["storage"]) for r in rows}
    assert got == {("dense", "masked"), ("chtsl", "masked"), ("chtsl", "csr"), ("cola", "masked")}
    for r in rows:
        assert r["step_s"] > 0 and r["linear_state_ratio"] > 0
        assert (r["topology_share"] is not None) == (r["method"] == "chtsl")


def _ratio_fits(ratio: float, num: float, den: float, digits: int, ratio_digits: int = 2) -> bool:
    """Whether a printed `ratio` (to `ratio_digits` decimals) is num/den for some values that print as
    `num` and `den` (to `digits` decimals): the interval the rounding leaves."""
    half, r_half = 0.5 * 10.0**-digits, 0.5 * 10.0**-ratio_digits
    low = (num - half) / (den + half)
    high = (num + half) / (den - half) if den > half else math.inf
    return low - r_half <= ratio <= high + r_half


def test_model_benchmark_prints_consistent_numbers() -> None:
    """benchmarks/model.py on the tiny preset, one round: every row's ratios follow from its own
    columns, and the resident sizes from the parameter counts (dense: every weight in fp32; CHTsL
    on the dense backend: S densified plus A and B, counted by `chtsl info`'s budget)."""
    from chtsl_infer.commands.info import budget_report
    from chtsl_infer.model.presets import build_config

    out = _run("model.py", "--preset", "tiny", "--batch", "2", "--seq", "8", "--rounds", "1", "--threads", "1")
    assert "batch 2 × seq 8 = 16 tokens/forward, 1 threads, 1 interleaved rounds" in out
    rows = {}
    for line in out.splitlines():
        m = re.fullmatch(r"(.+?\])\s+([\d.]+)\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)",
                         line.strip())
        if m:
            rows[m[1]] = [float(x.replace(",", "")) for x in m.groups()[1:]]
    assert set(rows) == {"dense model [dense]", "chtsl [sparse]", "chtsl [dense]", "dense model [transformers]"}
    base = rows["dense model [dense]"]
    for name, (median, best, tps, x_dense, best_x, mib, mib_x) in rows.items():
        assert 0 < best <= median + 5e-4 and tps > 0
        assert best_x == x_dense  # one round: its best is its median
        assert _ratio_fits(x_dense, tps, base[2], digits=0), name  # time ratio = tokens/s ratio
        assert _ratio_fits(mib_x, mib, base[5], digits=1, ratio_digits=3), name  # size ratio from the sizes
    assert base[3] == 1.0 and base[6] == 1.0
    dense = build_config("tiny", method="dense")
    h, f, n, v = dense.hidden_size, dense.intermediate_size, dense.num_hidden_layers, dense.vocab_size
    weights = v * h * (1 if dense.tie_word_embeddings else 2) + n * (4 * h * h + 3 * h * f + 2 * h) + h
    assert abs(base[5] - 4 * weights / 2**20) <= 0.06
    assert abs(rows["dense model [transformers]"][5] - base[5]) <= 0.06
    lowrank = sum(r["a_params"] + r["b_params"] for r in budget_report(build_config("tiny", s_total=0.9))["layers"])
    assert abs(rows["chtsl [dense]"][5] - 4 * (weights + lowrank) / 2**20) <= 0.06
    assert rows["chtsl [sparse]"][6] < 1  # the packed CSR model is smaller than the dense one


def test_kernel_benchmark_prints_consistent_numbers() -> None:
    """benchmarks/kernels.py on the 60M shapes (LLaMA-60M: hidden 512, MLP 1376), one repeat: every
    layer × token count × candidate once, and each ratio is the dense time over the candidate's."""
    out = _run("kernels.py", "--shapes", "llama60m", "--tokens", "1,16", "--repeats", "1", "--threads", "1")
    assert "threads 1, density 0.05, repeats 1" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("llama60m ")]
    assert sorted((r[1], r[2], int(r[3]), r[5]) for r in rows) == sorted(
        (layer, shape, t, candidate)
        for layer, shape in (("q_proj", "512×512"), ("gate_proj", "1376×512"), ("down_proj", "512×1376"))
        for t in (1, 16) for candidate in ("c-kernel", "torch-csr"))
    for r in rows:
        dense_ms, median_ms, best_ms, x_median, x_best = (float(x) for x in (r[4], *r[6:10]))
        assert dense_ms > 0 and median_ms == best_ms and x_median == x_best, r  # one repeat: median = best
        assert _ratio_fits(x_median, dense_ms, median_ms, digits=3), r


def test_load_benchmark_prints_slowdowns_against_the_cpu_share(tmp_path) -> None:
    """benchmarks/load.py on a tiny budget (2 training steps, the tiny model's decoding, two policies, one
    burner): every row's slowdown is its beside / alone, its ideal the CPU share's max(1, (T + B) / C),
    `× ideal` their ratio; the printed table carries the same numbers, and one row per job and policy."""
    # Loaded from its file: load.py drops benchmarks/ from sys.path when it leads it, so inserting and
    # popping around an import removed the entry after it (pytest's tests/, which spawned tests need).
    spec = importlib.util.spec_from_file_location("chtsl_load_benchmark", ROOT / "benchmarks" / "load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    ideal_slowdown = load.ideal_slowdown
    assert [ideal_slowdown(2, 1, 2), ideal_slowdown(2, 2, 2), ideal_slowdown(1, 1, 2), ideal_slowdown(4, 0, 2),
            ideal_slowdown(16, 1, 16)] == [1.5, 2.0, 1.0, 1.0, 17 / 16]
    out = tmp_path / "load.json"
    stdout = _run("load.py", "--train-steps", "2", "--decode-preset", "tiny", "--prompt-len", "8", "--new-tokens",
                  "4", "--decode-steps", "1", "--policies", "default,passive", "--burn", "1", "--json", str(out))
    rows = json.loads(out.read_text())
    assert [(r["job"], r["policy"]) for r in rows] == [("train", "default"), ("train", "passive"),
                                                        ("decode", "default"), ("decode", "passive")]
    cells = [[c for c in line.split() if c not in "│┃|"] for line in stdout.splitlines()]  # table borders off
    printed = [line for line in cells if line[:1] in (["train"], ["decode"])]
    assert len(printed) == len(rows)
    for r, line in zip(rows, printed, strict=True):
        assert r["alone_s"] > 0 and r["beside_s"] > 0 and r["burners"] == 1
        assert math.isclose(r["slowdown"], r["beside_s"] / r["alone_s"], rel_tol=1e-9)
        assert r["ideal"] == ideal_slowdown(r["threads"], 1, r["cores"])
        assert math.isclose(r["vs_ideal"], r["slowdown"] / r["ideal"], rel_tol=1e-9)
        alone, beside, slowdown, ideal, vs_ideal = map(float, line[2:7])
        assert line[:2] == [r["job"], r["policy"]] and ideal == round(r["ideal"], 2)
        assert _ratio_fits(slowdown, beside, alone, 3) and _ratio_fits(vs_ideal, slowdown, ideal, 2)


def test_hf_generate_benchmark_reports_every_row(tmp_path) -> None:
    """benchmarks/hf_generate.py on the tiny preset, one round: four rows, ratios from their own columns,
    the JSON beside the table, and from_pretrained's greedy tokens equal to chtsl generate's."""
    out = tmp_path / "hf.json"
    text = _run("hf_generate.py", "--preset", "tiny", "--prompt-len", "8", "--new-tokens", "4", "--rounds", "1",
                "--threads", "1", "--json", str(out))
    assert "greedy tokens of [from_pretrained] and [chtsl generate] equal" in text
    data = json.loads(out.read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert list(rows) == ["dense [transformers]", "chtsl [from_pretrained]", "chtsl [stock forward]",
                          "chtsl [chtsl generate]"]
    base = rows["dense [transformers]"]
    for r in rows.values():
        assert r["decode_x_dense"] == pytest.approx(r["decode_tokens_per_s"] / base["decode_tokens_per_s"])
        assert r["generate_x_dense"] == pytest.approx(base["generate_s"] / r["generate_s"])
        printed = next(line for line in text.splitlines() if line.startswith(r["row"]))
        assert f"{r['decode_tokens_per_s']:.1f}" in printed and f"{r['generate_x_dense']:.2f}" in printed
    assert data["same_tokens"] is True


def test_variants_benchmark_reports_every_model_and_variant(tmp_path) -> None:
    """benchmarks/variants.py: a row per (model, variant) with its ratio to the first variant; a variant
    the CPU's kernels cannot take is refused with one line."""
    out = tmp_path / "variants.json"
    _run("variants.py", "--models", "tiny:fp32,tiny:int8", "--variants", "base,tuned", "--rounds", "1",
         "--prompt-len", "8", "--new-tokens", "2", "--json", str(out))
    rows = json.loads(out.read_text())
    assert [(r["model"], r["variant"]) for r in rows] == [
        ("tiny:fp32", "base"), ("tiny:fp32", "tuned"), ("tiny:int8", "base"), ("tiny:int8", "tuned")]
    for r in rows:
        assert r["tokens_per_s"] > 0 and len(r["samples"]) == 1
        assert r["ratio"] == 1.0 if r["variant"] == "base" else r["ratio"] > 0
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "variants.py"), "--models", "tiny:fp32",
                           "--variants", "base,vw4"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode != 0 and "build variant 'vw4' does not apply" in proc.stderr
