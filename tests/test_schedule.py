"""LR schedule (docs/method.md §5): linear warm-up, cosine to min_lr_ratio·lr, restarted warm-ups."""

from __future__ import annotations

import math

import pytest

from train.schedule import LRSchedule


def reference_factor(step: int, *, total: int, warmup: int, min_ratio: float, interval: int | None,
                     t_end: float, restart: int) -> float:
    """Independent restatement: the plain curve, replaced after each update u by a linear ramp."""

    def curve(s: int) -> float:
        if s <= warmup:
            return s / warmup
        p = min(1.0, (s - warmup) / (total - warmup))
        return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * p)) / 2

    if interval:
        updates = [u for u in range(interval, math.ceil(t_end), interval) if u >= warmup]  # u < T_end
        for u in updates:
            if u < step <= u + restart:
                return (step - u) / restart * curve(u + restart)
    return curve(step)


@pytest.mark.parametrize("interval,restart", [(None, 0), (20, 5), (10, 3)])
def test_matches_reference(interval: int | None, restart: int) -> None:
    total, warmup, ratio = 300, 30, 0.1
    sched = LRSchedule(lr=3e-3, total_steps=total, warmup=warmup, min_lr_ratio=ratio, update_interval=interval,
                       t_end=0.75 * total, restart_warmup=restart)
    for step in range(1, total + 1):
        ref = reference_factor(step, total=total, warmup=warmup, min_ratio=ratio, interval=interval,
                               t_end=0.75 * total, restart=restart)
        assert sched(step) == pytest.approx(3e-3 * ref, rel=1e-12, abs=1e-15), step


def test_shape_landmarks() -> None:
    s = LRSchedule(lr=1.0, total_steps=100, warmup=10, min_lr_ratio=0.1, update_interval=20, t_end=75,
                   restart_warmup=4)
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(100) == pytest.approx(0.1)
    # After the update at 20: ramps from 1/4 of the cosine value at 24 up to it.
    assert s(21) == pytest.approx(0.25 * s.cosine(24))
    assert s(24) == pytest.approx(s.cosine(24))
    assert s(25) == pytest.approx(s.cosine(25))
    # No update after T_end = 75, so no restart at 80.
    assert s(81) == pytest.approx(s.cosine(81))
    assert s(61) == pytest.approx(0.25 * s.cosine(64))
    assert all(0 < s(t) <= 1.0 for t in range(1, 101))


def test_no_restarts_without_engine() -> None:
    s = LRSchedule(lr=2.0, total_steps=50, warmup=5, update_interval=None, restart_warmup=3)
    assert all(s(t) == pytest.approx(2.0 * s.cosine(t)) for t in range(1, 51))


def test_invalid() -> None:
    with pytest.raises(ValueError):
        LRSchedule(lr=1.0, total_steps=10, warmup=1, update_interval=5, restart_warmup=5)
    with pytest.raises(ValueError):
        LRSchedule(lr=1.0, total_steps=10, warmup=1, min_lr_ratio=1.5)
