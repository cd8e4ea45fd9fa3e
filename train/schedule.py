"""Learning-rate schedule of the paper (docs/method.md §5): warm-up, cosine to a floor, restarted warm-ups.

The LR of iteration `step` (1-based, as the topology engine counts) is `lr · factor(step)`:

- linear warm-up over the first `warmup` iterations (factor step / warmup);
- then cosine decay from 1 to `min_lr_ratio` at `total_steps`;
- after every topology update (iterations `u = k·update_interval < t_end`) a restarted linear
  warm-up of `restart_warmup` iterations climbs from 0 back to the cosine value at `u + restart_warmup`
  (GaLore's "cosine with multiple warm-ups", cycle = ΔT), so regrown links (w = 0) and the zeroed
  Adam moments are not hit by a full-size step.

The schedule is a pure function of the step, so its checkpoint state is just its configuration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LRSchedule:
    """lr (peak), warm-up and restart lengths in iterations; `update_interval=None`: no restarts."""

    lr: float
    total_steps: int
    warmup: int
    min_lr_ratio: float = 0.1
    update_interval: int | None = None
    t_end: float = 0.0  # topology updates happen at iterations strictly before it
    restart_warmup: int = 0

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.warmup < 0 or self.restart_warmup < 0:
            raise ValueError("total_steps must be >= 1, warmup and restart_warmup >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.update_interval is not None and self.restart_warmup >= self.update_interval:
            raise ValueError("restart_warmup must be shorter than the topology update interval")

    def cosine(self, step: int) -> float:
        """Factor of the plain warm-up + cosine curve at `step` (no restarts)."""
        if step <= self.warmup:
            return step / max(1, self.warmup)
        progress = min(1.0, (step - self.warmup) / max(1, self.total_steps - self.warmup))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def last_restart(self, step: int) -> int | None:
        """The latest topology-update iteration u < step (u >= 1), or None."""
        if self.update_interval is None or self.restart_warmup == 0:
            return None
        u = ((step - 1) // self.update_interval) * self.update_interval
        # the last update is the last multiple of ΔT strictly before T_end (ζ_t = 0 at T_end itself)
        u = min(u, (math.ceil(self.t_end / self.update_interval) - 1) * self.update_interval)
        return u if u >= 1 else None

    def factor(self, step: int) -> float:
        """LR multiplier of iteration `step` (1-based)."""
        u = self.last_restart(step)
        if u is not None and u >= self.warmup and step - u <= self.restart_warmup:
            # Linear climb to the cosine value at the end of the restarted warm-up.
            return (step - u) / self.restart_warmup * self.cosine(u + self.restart_warmup)
        return self.cosine(step)

    def __call__(self, step: int) -> float:
        """The learning rate of iteration `step`."""
        return self.lr * self.factor(step)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)
