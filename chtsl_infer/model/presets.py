"""Paper presets (docs/method.md §4–§5): architecture, training recipe and the (s, r) table per s_total.

Names are `<size>-<data>`, e.g. `llama60m-c4`, plus `tiny` for tests and `cpu60m` (the 60M
model's layers, (s, r) and recipe on a 2-core CPU budget) for comparisons on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from chtsl_infer.errors import ChtslError
from chtsl_infer.model import budget
from chtsl_infer.model.configuration import ChtslConfig
from chtsl_infer.model.methods import DEFAULT_METHOD, Method, get_method, uses_option
from chtsl_infer.model.storage import DEFAULT_STORAGE

S_TOTALS = (0.9, 0.8, 0.7)


@dataclass(frozen=True)
class Preset:
    """One row of the paper's recipe (docs/method.md §5) for a model size and dataset."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    steps: int
    warmup: int
    lr: float  # sparse / low-rank methods
    dense_lr: float
    sltrain_alpha: float
    table: dict[float, tuple[float, int]]  # s_total -> (s, r) for CHTsL
    align_lambda: float
    data: str = "c4"
    tokenizer: str = "t5-base"
    vocab_size: int = 32000
    seq_len: int = 256
    batch_size: int = 512  # global, sequences
    micro_batch_size: int = 64
    update_interval: int = 100  # ΔT, optimizer steps between topology updates
    restart_warmup: int = 20  # LR warm-up steps after each topology update
    min_lr_ratio: float = 0.1
    eval_every: int = 1000
    save_every: int = 1000
    ocr_every: int = 100
    eval_tokens: int = 10_000_000
    # Multiplier of the CoLA init std of A and B (docs/method.md §1): 1 in the paper presets (the
    # method spec); the CPU presets use 0.5, measured to balance B σ(A x) against S x (docs/fidelity.md).
    lowrank_init_scale: float = 1.0

    def init_scale(self, method: str | Method = DEFAULT_METHOD) -> float:
        """The low-rank init multiplier of `method` under this preset: the preset's value for methods
        whose two branches both start non-zero (`Method.balances_init_scale`), 1 for the others
        (S only, low-rank only, SLTrain's B = 0), whose init the preset does not change."""
        return self.lowrank_init_scale if get_method(method).balances_init_scale else 1.0

    def shapes(self) -> dict[str, tuple[int, int]]:
        return budget.linear_shapes(self.hidden_size, self.intermediate_size, self.num_heads)

    def split(self, s_total: float, method: str | Method = DEFAULT_METHOD) -> tuple[float, int]:
        """(s, r) of `method` at `s_total`: the paper's table for methods with both branches; the
        whole budget in S for S-only methods (chts) and in the rank for low-rank-only ones (cola);
        (0, 0) for a dense method."""
        m = get_method(method)
        if s_total not in self.table:
            valid = ", ".join(str(s) for s in self.table)
            raise ChtslError(f"s_total {s_total} is not in the table of preset {self.name}; valid: {valid}")
        if m.is_dense:
            return 0.0, 0
        if not m.has_lowrank:
            return s_total, 0
        if not m.has_sparse:
            return 0.0, round((1.0 - s_total) / budget.rank_density(self.shapes()))
        return self.table[s_total]


def _one_to_one(hidden: int, ffn: int, heads: int) -> dict[float, tuple[float, int]]:
    """Equal split of the budget between S and the low-rank branch (350M, 1B and tiny)."""
    per_rank = budget.rank_density(budget.linear_shapes(hidden, ffn, heads))
    return {st: (round(1 - (1 - st) / 2, 4), round((1 - st) / 2 / per_rank)) for st in S_TOTALS}


def _make_presets() -> dict[str, Preset]:
    sizes = {
        # name: hidden, ffn, layers, heads, steps, warmup, lr, sltrain α
        "llama60m": (512, 1376, 8, 8, 10_000, 1_000, 3e-3, 32.0),
        "llama130m": (768, 2048, 12, 12, 20_000, 2_000, 3e-3, 16.0),
        "llama350m": (1024, 2736, 24, 16, 60_000, 6_000, 3e-3, 16.0),
        "llama1b": (2048, 5461, 24, 32, 100_000, 10_000, 1e-3, 8.0),
    }
    tables = {  # Table 5 of the paper: s_total -> (s, r)
        ("llama60m", "owt"): {0.9: (0.95, 16), 0.8: (0.9, 32), 0.7: (0.85, 48)},
        ("llama130m", "owt"): {0.9: (0.95, 24), 0.8: (0.9, 48), 0.7: (0.85, 72)},
        ("llama60m", "c4"): {0.9: (0.95, 16), 0.8: (0.95, 48), 0.7: (0.95, 80)},
        ("llama130m", "c4"): {0.9: (0.95, 24), 0.8: (0.95, 72), 0.7: (0.95, 120)},
    }
    presets: dict[str, Preset] = {}
    for size, (h, f, n, heads, steps, warmup, lr, alpha) in sizes.items():
        for data in ("c4", "owt"):
            table = tables.get((size, data)) or _one_to_one(h, f, heads)
            lam = 0.3 if (size, data) == ("llama60m", "c4") else 0.5
            name = f"{size}-{data}"
            presets[name] = Preset(
                name=name, hidden_size=h, intermediate_size=f, num_layers=n, num_heads=heads, steps=steps,
                warmup=warmup, lr=lr, dense_lr=1e-3, sltrain_alpha=alpha, table=table, align_lambda=lam, data=data,
            )
    presets["tiny"] = Preset(
        name="tiny", hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4, steps=300, warmup=30,
        lr=3e-3, dense_lr=1e-3, sltrain_alpha=32.0, table=_one_to_one(128, 344, 4), align_lambda=0.3,
        data="builtin", tokenizer="bpe", vocab_size=4096, seq_len=128, batch_size=16, micro_batch_size=16,
        update_interval=20, restart_warmup=5, eval_every=100, save_every=100, ocr_every=25, eval_tokens=100_000,
        lowrank_init_scale=0.5,
    )
    # `cpu60m`: the 60M model's block shapes, so its per-layer (s, r) are the paper's OWT 60M ones
    # (rank 16 at s_total 0.9, d_c : d_l = 1 : 1 at every s_total), in 1 block with 64-token
    # sequences, a global batch of 6 and a 4096-token BPE: 1,000 steps fit in 10 minutes even on one
    # CPU core (docs/sweep.md §4 gives the measured cost; a second block would not). λ keeps the
    # 60M preset's effective alignment weight λ/√(B·N) (docs/method.md §2): its micro-batch × seq
    # is 64 × 256, this one's 6 × 64.
    ref = presets["llama60m-c4"]
    seq, batch = 64, 6
    presets["cpu60m"] = Preset(
        name="cpu60m", hidden_size=ref.hidden_size, intermediate_size=ref.intermediate_size, num_layers=1,
        num_heads=ref.num_heads, steps=1000, warmup=100, lr=ref.lr, dense_lr=ref.dense_lr,
        sltrain_alpha=ref.sltrain_alpha, table=tables[("llama60m", "owt")],
        align_lambda=round(ref.align_lambda * math.sqrt(batch * seq / (ref.micro_batch_size * ref.seq_len)), 4),
        data="builtin", tokenizer="bpe", vocab_size=4096, seq_len=seq, batch_size=batch, micro_batch_size=batch,
        update_interval=50, restart_warmup=10, eval_every=100, save_every=100, ocr_every=50, eval_tokens=10_000,
        lowrank_init_scale=0.5,
    )
    return presets


PRESETS: dict[str, Preset] = _make_presets()


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError naming the valid ones otherwise."""
    if name not in PRESETS:
        raise ChtslError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def build_config(
    preset: str | Preset,
    *,
    method: str = DEFAULT_METHOD,
    s_total: float = 0.9,
    sparsity: float | None = None,
    rank: int | None = None,
    activation: str | None = None,
    align_lambda: float | None = None,
    align_layers: str = "all",
    vocab_size: int | None = None,
    storage: str = DEFAULT_STORAGE,
    lowrank_init_scale: float | None = None,
    **llama_overrides: Any,
) -> ChtslConfig:
    """The `ChtslConfig` of a preset at `s_total` (explicit `sparsity`/`rank` override the table;
    `lowrank_init_scale` None: the preset's for this method, `Preset.init_scale`).

    A setting `method` does not use (`methods.uses_option`: `rank` of chts, `sparsity` of cola,
    `align_lambda` of dense, ...) is ignored, so the config describes the model that is built;
    `chtsl train` names such settings in a warning (`methods.unused_options_warning`)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    m = get_method(method)
    s, r = p.split(s_total, m)
    sparsity = sparsity if uses_option(m, "sparsity") else None
    rank = rank if uses_option(m, "rank") else None
    activation = activation if uses_option(m, "activation") else None
    align_lambda = align_lambda if uses_option(m, "align_lambda") else None
    align_layers = align_layers if uses_option(m, "align") else "all"
    lowrank_init_scale = lowrank_init_scale if uses_option(m, "lowrank_init_scale") else 1.0
    block = {
        "method": method,
        "sparsity": s if sparsity is None else sparsity,
        "rank": r if rank is None else rank,
        "activation": activation,
        "alpha": p.sltrain_alpha if m.scale == "alpha_over_rank" else None,
        "align_lambda": p.align_lambda if align_lambda is None else align_lambda,
        "align_layers": align_layers,
        "storage": storage,
        "lowrank_init_scale": p.init_scale(m) if lowrank_init_scale is None else lowrank_init_scale,
    }
    fields = dict(
        vocab_size=vocab_size or p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_heads,
        max_position_embeddings=max(p.seq_len, 256), rms_norm_eps=1e-6, initializer_range=0.02,
        tie_word_embeddings=False, chtsl=block,
    )
    fields.update(llama_overrides)
    return ChtslConfig(**fields)
