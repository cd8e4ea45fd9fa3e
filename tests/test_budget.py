"""Budget accounting (docs/method.md §4) and `chtsl info`, against the paper's Table 5."""

from __future__ import annotations

import json
import re

import pytest

from chtsl_infer.model.modeling import ChtslLlamaForCausalLM
from chtsl_infer.model.presets import build_config
from tests.conftest import run_cli

# (preset, s_total) rows of Table 5, plus the 350M 0.9 row
TABLE5 = [
    (f"{size}-{data}", st) for size in ("llama60m", "llama130m") for data in ("c4", "owt") for st in (0.9, 0.8, 0.7)
]
TABLE5.append(("llama350m-c4", 0.9))


@pytest.mark.parametrize("preset,s_total", TABLE5)
def test_info_json_matches_paper(preset: str, s_total: float) -> None:
    code, out, _ = run_cli(["info", "--preset", preset, "--s-total", str(s_total), "--json", "-"])
    assert code == 0
    report = json.loads(out)
    assert abs(report["s_total"] - s_total) <= 0.005
    expected_step = {"llama60m": 16, "llama130m": 24, "llama350m": 32}[preset.split("-")[0]]
    assert report["rank_step"] == expected_step
    assert report["totals"]["trainable_linear_params"] == sum(r["trainable_params"] for r in report["layers"])


@pytest.mark.slow  # builds the 60M model
@pytest.mark.parametrize("method", ["chtsl", "chts", "cola", "sltrain", "dense"])
def test_info_counts_equal_model_entries(method: str) -> None:
    code, out, _ = run_cli(["info", "--preset", "llama60m-c4", "--method", method, "--json", "-"])
    assert code == 0
    report = json.loads(out)
    model = ChtslLlamaForCausalLM(build_config("llama60m-c4", method=method))
    assert report["totals"]["trainable_linear_params"] == model.trainable_linear_params()
    masks = sum(int(m.mask.sum()) for m in model.sparse_layers().values())
    assert masks == sum(r["sparse_params"] for r in report["layers"]) or method == "dense"
    total = sum(p.numel() for n, p in model.named_parameters() if "layers." not in n or "norm" in n)
    assert report["totals"]["other_params"] == total


def test_info_table_prints_the_budget(tmp_path) -> None:
    """`chtsl info`'s table read back, against LLaMA-130M's architecture (hidden 768, MLP 2048, 12 blocks,
    a 32,000-token vocabulary, untied lm_head): per layer type dense = out·in·L, A = r·in·L, B = out·r·L and
    S = (1 − s)·dense; the caption's totals from the rows and the requested s_total; --json the same numbers."""
    code, out, _ = run_cli(["info", "--preset", "llama130m-owt", "--s-total", "0.8", "--json",
                            str(tmp_path / "r.json")])
    assert code == 0
    layers, h, f, vocab = 12, 768, 2048, 32000
    rows = {}
    for line in out.splitlines():
        m = re.fullmatch(r"(\w+_proj)\s+(\d+)×(\d+)\s+([\d.]+)\s+(\d+)" + r"\s+([\d,]+)" * 4, line.strip())
        if m:
            counts = (int(x.replace(",", "")) for x in m.groups()[5:])  # S, A, B, dense
            rows[m[1]] = (int(m[2]), int(m[3]), float(m[4]), int(m[5]), *counts)
    assert {k: v[:2] for k, v in rows.items()} == {
        "q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
        "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    for name, (n_out, n_in, s, r, sparse, a, b, dense) in rows.items():
        assert dense == n_out * n_in * layers and a == r * n_in * layers and b == n_out * r * layers, name
        assert abs(sparse - (1 - s) * dense) <= 5e-4 * dense, name  # s printed to 3 decimals
    caption = " ".join(out.split())  # the caption wraps at the console's width
    m = re.search(r"dense linear params ([\d,]+) · trainable linear params ([\d,]+) \(([\d.]+)×\) · "
                  r"s_total ([\d.]+) · .* embeddings\+lm_head\+norms ([\d,]+)", caption)
    assert m, caption
    total_dense, trainable, ratio, s_total, other = (float(x.replace(",", "")) for x in m.groups())
    assert total_dense == sum(r[7] for r in rows.values())
    assert trainable == sum(r[4] + r[5] + r[6] for r in rows.values())
    assert ratio == round(trainable / total_dense, 3) and s_total == round(1 - trainable / total_dense, 4)
    assert abs(s_total - 0.8) <= 0.005  # the requested total sparsity (the paper's Table 5 row)
    assert other == 2 * vocab * h + (2 * layers + 1) * h  # embeddings, lm_head, 2 norms per block + the final
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(r["type"], r["sparse_params"], r["a_params"], r["b_params"]) for r in report["layers"]] == [
        (k, v[4], v[5], v[6]) for k, v in rows.items()]


def test_info_table_fits_80_columns_untruncated(monkeypatch) -> None:
    from chtsl_infer.console import console
    from chtsl_infer.model.presets import PRESETS

    monkeypatch.setattr(console, "width", 80)
    for preset in PRESETS:
        code, out, _ = run_cli(["info", "--preset", preset, "--s-total", "0.7", "--method", "cola"])
        assert code == 0 and "…" not in out and max(len(line) for line in out.splitlines()) <= 80
        assert "down_proj" in out and "gate_proj" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--preset", "llama2m-c4"], "valid: llama60m-c4"),
        (["--preset", "llama60m-c4", "--s-total", "0.5"], "valid: 0.9, 0.8, 0.7"),
        (["--rank", "-4"], "positive integer"),
        (["--sparsity", "1.5"], "[0, 1)"),
        (["--sparsity", "-0.1"], "[0, 1)"),
        (["--method", "lora"], "valid: dense"),
    ],
)
def test_info_bad_input_one_line_exit_2(args: list[str], needle: str) -> None:
    code, out, err = run_cli(["info", *args])
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("method", ["chtsl", "chts", "cola", "dense"])
def test_info_packed_sizes_equal_the_packed_tensors(method: str) -> None:
    """`chtsl info`'s bytes per link and per decoded token (from the budget's counts) equal those of a packed
    model of the preset in each dtype (from its tensors; padding links of the 8-bit deltas aside)."""
    import torch

    from chtsl_infer.commands.info import budget_report
    from chtsl_infer.formats.packed import convert_packed
    from chtsl_infer.runtime.backends import random_packed

    config = build_config("tiny", method=method, s_total=0.9)
    report = budget_report(config, "tiny")
    fp32 = random_packed(config, seed=0)
    for row in report["packed"]:
        packed = convert_packed(fp32, {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}[row["dtype"]])
        assert packed.index == row["index"]
        cost = packed.decode_bytes()
        pads = sum(lin.nnz for lin in packed.linears.values()) - sum(lin.nnz for lin in fp32.linears.values())
        assert 0 <= cost["total"] - row["bytes_per_token"] <= 2 * pads, row
        if row["bytes_per_link"] is None:
            assert cost["per_link"] != cost["per_link"]  # NaN: no sparse branch
        else:
            assert cost["per_link"] == pytest.approx(row["bytes_per_link"], rel=1e-2 if pads else 1e-12), row
