"""`ChtslConfig`: a `LlamaConfig` with a `chtsl` block describing the block linears (docs/formats.md §1)."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, LlamaConfig

from chtsl_infer.errors import ChtslError
from chtsl_infer.model import budget
from chtsl_infer.model.layers import ACTIVATIONS, LAYER_TYPES
from chtsl_infer.model.methods import DEFAULT_METHOD, get_method
from chtsl_infer.model.storage import DEFAULT_STORAGE, check_storage

ALIGN_CHOICES = ("all", "qk", "others")

DEFAULT_BLOCK: dict[str, Any] = {
    "method": DEFAULT_METHOD,
    "sparsity": 0.95,
    "rank": 16,
    "activation": None,  # None: the method's own (SiLU for chtsl/act/cola, identity otherwise)
    "alpha": None,  # SLTrain's α (scale α/r of its low-rank product)
    "align_lambda": 0.3,
    "align_layers": "all",
    "storage": DEFAULT_STORAGE,  # how the sparse branch holds S in training: masked | csr (storage.STORAGES)
    "lowrank_init_scale": 1.0,  # multiplier of the low-rank factors' init std (an ablation knob)
}


def normalize_block(block: dict[str, Any] | None) -> dict[str, Any]:
    """Fills defaults, expands scalar sparsity/rank to every layer type, validates, adds `s_total`.

    Raises ValueError with a one-line message naming the valid choices.
    """
    out = {**DEFAULT_BLOCK, **(block or {})}
    method = out["method"]
    spec = get_method(method)
    for key, cast in (("sparsity", float), ("rank", int)):
        value = out[key]
        per_type = dict(value) if isinstance(value, dict) else {t: value for t in LAYER_TYPES}
        if set(per_type) != set(LAYER_TYPES):
            raise ChtslError(f"chtsl.{key} must name every layer type: {', '.join(LAYER_TYPES)}")
        out[key] = {t: cast(per_type[t]) for t in LAYER_TYPES}
    has_sparse, has_lowrank = spec.has_sparse, spec.has_lowrank
    for t, s in out["sparsity"].items():
        if has_sparse and not 0.0 <= s < 1.0:
            raise ChtslError(f"sparsity of {t} must be in [0, 1), got {s}")
    for t, r in out["rank"].items():
        if r < 0 or (has_lowrank and r == 0):
            raise ChtslError(f"rank of {t} must be a positive integer for method {method!r}, got {r}")
    out["activation"] = out["activation"] or spec.activation
    if out["activation"] not in ACTIVATIONS:
        raise ChtslError(f"unknown activation {out['activation']!r}; valid: {', '.join(ACTIVATIONS)}")
    if out["align_layers"] not in ALIGN_CHOICES:
        raise ChtslError(f"unknown align layers {out['align_layers']!r}; valid: {', '.join(ALIGN_CHOICES)}")
    if float(out["align_lambda"]) < 0:
        raise ChtslError(f"alignment lambda must be >= 0, got {out['align_lambda']}")
    out["align_lambda"] = float(out["align_lambda"])
    if not float(out["lowrank_init_scale"]) > 0:
        raise ChtslError(f"lowrank_init_scale must be > 0, got {out['lowrank_init_scale']}")
    check_storage(method, out["storage"])
    return out


class ChtslConfig(LlamaConfig):
    """Llama fields plus `chtsl`: method, per-layer-type sparsity and rank, activation, alignment.

    `chtsl["s_total"]` is recomputed from the architecture on every construction (docs/method.md §4).
    """

    model_type = "chtsl_llama"
    chtsl: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        block = normalize_block(self.chtsl)
        shapes = self.linear_shapes()
        d_c, d_l = budget.densities(shapes, block["method"], block["sparsity"], block["rank"])
        block.update(s_total=round(1.0 - d_c - d_l, 6), d_c=round(d_c, 6), d_l=round(d_l, 6))
        self.chtsl = block

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each block linear type."""
        return budget.linear_shapes(
            self.hidden_size, self.intermediate_size, self.num_attention_heads, self.num_key_value_heads
        )

    @property
    def method(self) -> str:
        return self.chtsl["method"]

    def align_layer_types(self) -> tuple[str, ...]:
        """Layer types whose branches enter the alignment loss (none unless the method aligns)."""
        if not get_method(self.method).aligns or self.chtsl["align_lambda"] == 0:
            return ()
        which = self.chtsl["align_layers"]
        if which == "qk":
            return ("q_proj", "k_proj")
        if which == "others":
            return tuple(t for t in LAYER_TYPES if t not in ("q_proj", "k_proj"))
        return LAYER_TYPES


AutoConfig.register(ChtslConfig.model_type, ChtslConfig, exist_ok=True)  # see chtsl_infer/__init__.py
