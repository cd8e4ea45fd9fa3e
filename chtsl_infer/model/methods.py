"""The method registry: what each `--method` means, in one object per method (docs/method.md §1, §3, §5).

Every other module asks this registry (`get_method(name).has_lowrank`, `.topology`, ...) instead
of comparing method names, so adding a method is one `Method(...)` entry here plus its tests.
A method decides:

- which branches a `SparseLowRankLinear` has (`is_dense`, `has_sparse`, `has_lowrank`) and the
  low-rank branch's default activation and scale (1, or SLTrain's α/r);
- how the branches are initialised (`init`: Hugging Face normal + CoLA factors, or SLTrain's);
- how training manages the sparse support (`topology`: CHTs engine mode and BRF randomness of the
  initial masks, or none), which optimizer it uses and its default gradient clipping;
- whether the alignment loss applies, and whether a preset gives it the dense learning rate.

How a preset splits a total sparsity between S and the rank follows from the branches alone
(`chtsl_infer.model.presets.Preset.split`), so it needs no field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from chtsl_infer.errors import ChtslError


@dataclass(frozen=True)
class Method:
    """One way of building (and training) the block linears; see the module docstring."""

    name: str
    description: str
    has_sparse: bool  # S, held in training as `chtsl_infer.model.storage` says (masked or csr), CSR in exports
    has_lowrank: bool  # scale · B σ(A x)
    is_dense: bool = False  # a plain Linear: `weight` is the full matrix, no mask
    activation: str = "identity"  # default σ of the low-rank branch
    scale: Literal["one", "alpha_over_rank"] = "one"  # SLTrain scales B A x by α/r
    init: Literal["normal", "sltrain"] = "normal"  # see ChtslLlamaModel._init_weights
    topology: Literal["chts", "static"] | None = None  # mode of train.topology.TopologyEngine
    brf_randomness: float = 0.0  # BRF randomness of the initial masks (`chts` topology only)
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # default max gradient norm (0 = no clipping)
    aligns: bool = False  # the layer-wise alignment loss between S and the low-rank branch
    uses_dense_lr: bool = False  # presets give it `Preset.dense_lr` instead of `Preset.lr`

    @property
    def balances_init_scale(self) -> bool:
        """Whether a preset's low-rank init multiplier applies: both branches start non-zero (CoLA
        factors next to S), so their relative scale at step 1 is a choice (docs/fidelity.md)."""
        return self.has_sparse and self.has_lowrank and self.init == "normal"

    def lowrank_scale(self, alpha: float | None, rank: int) -> float:
        """The factor of the low-rank product: α/r for SLTrain (α defaults to 32), else 1."""
        return (alpha or 32.0) / rank if self.scale == "alpha_over_rank" else 1.0


_HYBRID = dict(has_sparse=True, has_lowrank=True, topology="chts")

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dense", "plain Linear", has_sparse=False, has_lowrank=False, is_dense=True, uses_dense_lr=True),
        Method("chts", "S only, CHTs dynamic sparse training", has_sparse=True, has_lowrank=False,
               topology="chts", brf_randomness=0.25),
        Method("cola", "B·SiLU(A x) only", has_sparse=False, has_lowrank=True, activation="silu",
               optimizer="adamw", weight_decay=0.01, grad_clip=0.5),
        Method("sltrain", "static random S + (α/r)·B A x", has_sparse=True, has_lowrank=True,
               scale="alpha_over_rank", init="sltrain", topology="static", brf_randomness=1.0),
        Method("naive", "S + B A x", **_HYBRID),
        Method("act", "S + B·SiLU(A x)", activation="silu", **_HYBRID),
        Method("chtsl", "S + B·SiLU(A x) + alignment loss", activation="silu", aligns=True, **_HYBRID),
    )
}
DEFAULT_METHOD = "chtsl"
DENSE = "dense"  # the baseline every benchmark compares against
METHOD_CHOICES = ", ".join(METHODS)  # for --help texts


# The settings only some methods read (TrainArgs field names), each with what a method needs to read it.
_NEEDS: dict[str, tuple[str, Callable[[Method], bool]]] = {
    "sparsity": ("no sparse branch", lambda m: m.has_sparse),
    "rank": ("no low-rank branch", lambda m: m.has_lowrank),
    "activation": ("no low-rank branch", lambda m: m.has_lowrank),
    "lowrank_lr_scale": ("no low-rank branch", lambda m: m.has_lowrank),
    "lowrank_init_scale": ("no low-rank branch", lambda m: m.has_lowrank),
    "align_lambda": ("no alignment loss", lambda m: m.aligns),
    "align": ("no alignment loss", lambda m: m.aligns),
    "brf_randomness": ("no dynamic topology", lambda m: m.topology == "chts"),
    "update_interval": ("no dynamic topology", lambda m: m.topology == "chts"),
    "restart_warmup": ("no dynamic topology", lambda m: m.topology == "chts"),
}


def uses_option(method: str | Method, name: str) -> bool:
    """Whether `method` reads the setting `name` (a `chtsl train` option as its TrainArgs field name:
    `rank`, `sparsity`, `activation`, `align_lambda`, ...); settings every method reads: True."""
    need = _NEEDS.get(name)
    return need is None or need[1](get_method(method))


def unused_options_warning(method: str | Method, given: Iterable[str]) -> str | None:
    """One line naming the settings in `given` (TrainArgs field names given explicitly) that `method`
    does not use, each with why, e.g. "method 'chts' does not use --rank (no low-rank branch); ...";
    None when it uses them all."""
    m = get_method(method)
    unused = [name for name in given if not uses_option(m, name)]
    if not unused:
        return None
    flags = ", ".join(f"--{name.replace('_', '-')} ({_NEEDS[name][0]})" for name in unused)
    return f"method {m.name!r} does not use {flags}: ignored, not written to config.json"


def get_method(name: str | Method) -> Method:
    """The registry entry of `name` (a `Method` passes through); ChtslError naming the valid ones."""
    if isinstance(name, Method):
        return name
    try:
        return METHODS[name]
    except KeyError:
        raise ChtslError(f"unknown method {name!r}; valid: {', '.join(METHODS)}") from None
