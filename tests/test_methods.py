"""The method registry: every module reads a method's meaning from its one `Method` entry."""

from __future__ import annotations

import dataclasses

import pytest

from chtsl_infer.errors import ChtslError
from chtsl_infer.model.layers import SparseLowRankLinear
from chtsl_infer.model.methods import METHODS, Method, get_method
from chtsl_infer.model.modeling import ChtslLlamaForCausalLM
from chtsl_infer.model.presets import build_config, get_preset
from train.args import TrainArgs, resolve_args
from train.trainer import build_engine


@pytest.mark.parametrize("name", list(METHODS))
def test_layer_follows_its_method(name: str) -> None:
    m = get_method(name)
    layer = SparseLowRankLinear(16, 8, method=name, sparsity=0.5, rank=2, alpha=4.0)
    assert (layer.weight is not None) == (m.has_sparse or m.is_dense) and (layer.mask is not None) == m.has_sparse
    assert (layer.lora_A is not None) == m.has_lowrank
    assert layer.scale == (2.0 if m.scale == "alpha_over_rank" else 1.0)
    assert layer.activation == (m.activation if m.has_lowrank else "identity")


def test_paper_settings_of_the_baselines() -> None:
    """The per-method choices of docs/method.md §1, §3, §5, as the trainer used to spell them."""
    settings = {n: (m.topology, m.brf_randomness, m.optimizer, m.weight_decay, m.grad_clip, m.aligns)
                for n, m in METHODS.items()}
    assert settings == {
        "dense": (None, 0.0, "adam", 0.0, 0.0, False),
        "chts": ("chts", 0.25, "adam", 0.0, 0.0, False),
        "cola": (None, 0.0, "adamw", 0.01, 0.5, False),
        "sltrain": ("static", 1.0, "adam", 0.0, 0.0, False),
        "naive": ("chts", 0.0, "adam", 0.0, 0.0, False),
        "act": ("chts", 0.0, "adam", 0.0, 0.0, False),
        "chtsl": ("chts", 0.0, "adam", 0.0, 0.0, True),
    }
    assert [n for n, m in METHODS.items() if m.uses_dense_lr] == ["dense"]


def test_unknown_method_names_the_valid_ones() -> None:
    with pytest.raises(ChtslError, match="unknown method 'lora'; valid: dense, chts"):
        get_method("lora")
    with pytest.raises(ChtslError, match="unknown method 'lora'"):
        build_config("tiny", method="lora")


def test_a_new_method_is_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry entry alone makes a method usable by the config, model, budget, presets and trainer."""
    new = dataclasses.replace(METHODS["act"], name="act_aligned", aligns=True, grad_clip=0.25, brf_randomness=0.5)
    monkeypatch.setitem(METHODS, new.name, new)
    config = build_config("tiny", method=new.name, s_total=0.8, num_hidden_layers=1, vocab_size=64)
    assert config.chtsl["s_total"] == pytest.approx(0.8, abs=0.01)
    assert config.align_layer_types() and (config.chtsl["sparsity"], config.chtsl["rank"]) == (
        build_config("tiny", method="chtsl", s_total=0.8).chtsl["sparsity"],
        build_config("tiny", method="chtsl", s_total=0.8).chtsl["rank"])
    model = ChtslLlamaForCausalLM(config)
    assert all(m.has_sparse and m.has_lowrank for m in model.chtsl_layers().values())
    engine = build_engine(model, total_steps=10, update_interval=5)
    assert engine.mode == "chts" and engine.brf_randomness == 0.5
    args = resolve_args(TrainArgs(method=new.name))
    assert args.grad_clip == 0.25 and args.lr == get_preset("tiny").lr


def test_method_objects_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        METHODS["chtsl"].aligns = False  # type: ignore[misc]
    assert isinstance(get_method(METHODS["cola"]), Method)


def test_ablation_options_reach_the_model_engine_and_optimizer() -> None:
    """`--sparsity/--rank`, `--activation`, `--lowrank-init-scale`, `--brf-randomness` and
    `--lowrank-lr-scale` (the method-fidelity ablations, docs/fidelity.md) each change what they name."""
    import torch

    from train.args import build_model_config
    from train.trainer import build_optimizer

    base = resolve_args(TrainArgs(method="chtsl"))
    args = resolve_args(TrainArgs(method="chtsl", sparsity=0.5, rank=3, activation="relu", lowrank_init_scale=2.0,
                                  brf_randomness=1.0, lowrank_lr_scale=0.25))
    config = build_model_config(args, vocab_size=64)
    assert set(config.chtsl["sparsity"].values()) == {0.5} and set(config.chtsl["rank"].values()) == {3}
    assert config.chtsl["activation"] == "relu"
    stds = {}
    for a, scale in ((base, 0.5), (args, 2.0)):  # base: the tiny preset's own scale
        torch.manual_seed(0)
        cfg = build_model_config(a, vocab_size=64, num_hidden_layers=1, hidden_size=256, intermediate_size=512,
                                 num_attention_heads=4, num_key_value_heads=4)
        layer = ChtslLlamaForCausalLM(cfg).model.layers[0].mlp.up_proj
        sigma0 = (layer.rank * (layer.in_features + layer.out_features)) ** -0.25
        stds[scale] = float(layer.lora_A.detach().std()) / sigma0
    assert stds[0.5] == pytest.approx(0.5, rel=0.1) and stds[2.0] == pytest.approx(2.0, rel=0.1)
    model = ChtslLlamaForCausalLM(config)
    assert build_engine(model, total_steps=10, update_interval=5, brf_randomness=args.brf_randomness
                        ).brf_randomness == 1.0
    assert build_engine(model, total_steps=10, update_interval=5).brf_randomness == 0.0
    optimizer = build_optimizer(model, 1e-3, lowrank_lr_scale=0.25)
    lowrank = {id(p) for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    (rest, low) = optimizer.param_groups
    assert {id(p) for p in low["params"]} == lowrank and not lowrank & {id(p) for p in rest["params"]}
    assert low["lr_scale"] == 0.25 and len(build_optimizer(model, 1e-3).param_groups) == 1


def test_lowrank_lr_scale_scales_the_scheduled_lr_of_a_and_b(tmp_path) -> None:
    from tests.conftest import small_args
    from train.args import resolve_args
    from train.distributed import DistInfo
    from train.trainer import build_run, train_step

    run = build_run(resolve_args(small_args(tmp_path, steps=4, lowrank_lr_scale=0.5)), DistInfo(), None, {})
    record = train_step(run, 1)
    rest, low = run.optimizer.param_groups
    assert rest["lr"] == record["lr"] > 0 and low["lr"] == pytest.approx(0.5 * record["lr"])
    assert set(record["grad_norms"]) == {"S", "A", "B"} and all(v > 0 for v in record["grad_norms"].values())
    assert set(record["sparse_rms"]) == set(record["ocr"]) and all(v > 0 for v in record["lowrank_rms"].values())


def test_cpu_presets_carry_the_balanced_lowrank_init() -> None:
    """tiny and cpu60m start the low-rank branch at 0.5 × CoLA's σ0 for the methods whose two
    branches both start non-zero (docs/fidelity.md); every other method, and every paper preset,
    keeps the spec's σ0; an explicit --lowrank-init-scale wins; `chtsl info` reports it."""
    from chtsl_infer.commands.info import budget_report
    from chtsl_infer.model.presets import PRESETS

    for name in PRESETS:
        for method in METHODS:
            expected = 0.5 if name in ("tiny", "cpu60m") and method in ("naive", "act", "chtsl") else 1.0
            assert resolve_args(TrainArgs(preset=name, method=method)).lowrank_init_scale == expected, (name, method)
            config = build_config(name, method=method)
            assert config.chtsl["lowrank_init_scale"] == expected
            assert budget_report(config, name)["lowrank_init_scale"] == expected
    assert resolve_args(TrainArgs(preset="cpu60m", lowrank_init_scale=1.0)).lowrank_init_scale == 1.0
    assert build_config("cpu60m", lowrank_init_scale=0.25).chtsl["lowrank_init_scale"] == 0.25
