"""The language-model loss (`token_nll_sum`) and validation perplexity built on it.

The trainer optimises `token_nll_sum`; `perplexity` is exp(mean next-token NLL over the
non-padding targets of some batches). Both `chtsl train` (every `--eval-every` steps) and
`chtsl eval --perplexity` use them on the same `train.data.pipeline` validation batches, so both report
the same number for a checkpoint. They live here, in the library, so that `train/` and `evals/`
share them without importing each other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PerplexityResult:
    """ppl = exp(nll); nll: mean NLL per target token (nats); tokens: targets counted."""

    ppl: float
    nll: float
    tokens: int


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL (fp32) of `logits` (b, seq, vocab) against `labels` (b, seq), -100
    ignored, and the number of targets: position t predicts labels[t + 1] (as HF's causal LM loss)."""
    target = labels[:, 1:].reshape(-1)
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target, ignore_index=-100, reduction="sum"
    )
    return nll, int((target != -100).sum())


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: Iterable, device: str | torch.device = "cpu") -> PerplexityResult:
    """Perplexity of `model` on `batches` (objects with `input_ids`, `labels` (b, seq) int64).

    Padding is right-side, so causal attention never lets a real token see a pad and no attention
    mask is needed; pads only appear as ignored targets. bf16 autocast on CUDA, fp32 on CPU.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    total, count = 0.0, 0
    try:
        for b in batches:
            with autocast:
                logits = model(input_ids=b.input_ids.to(device)).logits
            nll, n = token_nll_sum(logits, b.labels.to(device))
            total += float(nll)
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no target tokens to compute a perplexity on")
    nll = total / count
    return PerplexityResult(ppl=exp_or_inf(nll), nll=nll, tokens=count)


def exp_or_inf(x: float) -> float:
    """exp(x), or inf where it overflows a float (a diverged model's NLL): a perplexity, never a crash."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
