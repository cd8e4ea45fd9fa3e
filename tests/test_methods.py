"""The method registry: every module reads a method's meaning from its one `Method` entry."""

from __future__ import annotations

import dataclasses

import pytest

from chtsl_infer.errors import ChtslError
from chtsl_infer.layers import SparseLowRankLinear
from chtsl_infer.methods import METHODS, Method, get_method
from chtsl_infer.modeling import ChtslLlamaForCausalLM
from chtsl_infer.presets import build_config, get_preset
from train.args import TrainArgs, resolve_args
from train.trainer import build_engine


@pytest.mark.parametrize("name", list(METHODS))
def test_layer_follows_its_method(name: str) -> None:
    m = get_method(name)
    layer = SparseLowRankLinear(16, 8, method=name, sparsity=0.5, rank=2, alpha=4.0)
    assert (layer.weight is not None) == m.has_weight and (layer.mask is not None) == m.has_sparse
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
