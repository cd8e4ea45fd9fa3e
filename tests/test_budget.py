"""Budget accounting (docs/method.md §4) and `chtsl info`, against the paper's Table 5."""

from __future__ import annotations

import json

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


def test_info_table_prints() -> None:
    code, out, _ = run_cli(["info", "--preset", "llama130m-owt", "--s-total", "0.8"])
    assert code == 0 and "q_proj" in out and "s_total" in out


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
