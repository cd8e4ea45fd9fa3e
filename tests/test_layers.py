"""SparseLowRankLinear against hand-written forwards, and the branch losses of docs/method.md §2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chtsl_infer.model.layers import (
    SparseLowRankLinear,
    alignment_loss,
    branch_cosine,
    layer_alignment,
    layer_link_count,
    ocr,
    random_mask,
    record_branches,
)
from chtsl_infer.model.methods import METHODS
from tests.conftest import lowrank_branch


def make_layer(method: str, seed: int = 0, **kw) -> SparseLowRankLinear:
    torch.manual_seed(seed)
    layer = SparseLowRankLinear(24, 40, method=method, sparsity=0.8, rank=4, **kw)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
        if layer.mask is not None:
            layer.weight.mul_(layer.mask)
    return layer


def reference_forward(layer: SparseLowRankLinear, x: torch.Tensor) -> torch.Tensor:
    """The method's formula written out with explicit matrices (docs/method.md §1)."""
    s = (layer.weight * layer.mask) if layer.mask is not None else layer.weight
    silu = lambda z: z * torch.sigmoid(z)  # noqa: E731
    if layer.method == "dense" or layer.method == "chts":
        return x @ s.T
    a, b = layer.lora_A, layer.lora_B
    if layer.method == "cola":
        return silu(x @ a.T) @ b.T
    if layer.method == "sltrain":
        return x @ s.T + (32.0 / layer.rank) * (x @ a.T) @ b.T
    if layer.method == "naive":
        return x @ s.T + (x @ a.T) @ b.T
    return x @ s.T + silu(x @ a.T) @ b.T  # act, chtsl


@pytest.mark.parametrize("method", list(METHODS))
def test_layer_matches_reference(method: str) -> None:
    layer = make_layer(method)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-5)


def test_relu_gelu_identity_activations() -> None:
    x = torch.randn(7, 24)
    for act, fn in (("relu", F.relu), ("gelu", F.gelu), ("identity", lambda z: z)):
        layer = make_layer("act", activation=act)
        expected = x @ (layer.weight * layer.mask).T + fn(x @ layer.lora_A.T) @ layer.lora_B.T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_gradients_vanish_outside_mask() -> None:
    layer = make_layer("chtsl")
    layer(torch.randn(6, 24)).pow(2).sum().backward()
    assert layer.weight.grad[~layer.mask].abs().max() == 0
    assert layer.weight.grad[layer.mask].abs().max() > 0


def test_random_mask_exact_counts_per_group() -> None:
    mask = random_mask(64, 30, 0.9, group_rows=16, generator=torch.Generator().manual_seed(1))
    per_group = mask.view(4, 16 * 30).sum(1)
    assert per_group.tolist() == [math.floor(0.1 * 16 * 30)] * 4
    assert int(mask.sum()) == layer_link_count(64, 30, 0.9, 16)


def test_invalid_configuration_rejected() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        SparseLowRankLinear(4, 4, method="lora")
    with pytest.raises(ValueError, match="sparsity"):
        SparseLowRankLinear(4, 4, method="chts", sparsity=1.0)
    with pytest.raises(ValueError, match="positive rank"):
        SparseLowRankLinear(4, 4, method="chtsl", sparsity=0.5, rank=0)


def test_alignment_ocr_cosine_by_hand() -> None:
    s = torch.tensor([[[1.0, -2.0], [3.0, 0.5]]])  # (B=1, seq=2, out=2)
    low = torch.tensor([[[-0.5, -1.0], [1.0, -4.0]]])
    # ||S-L||_F / (B·N), N = seq·out = 4: diff = [1.5, -1, 2, 4.5] -> sqrt(2.25+1+4+20.25)
    assert alignment_loss(s, low).item() == pytest.approx(math.sqrt(27.5) / 4)
    # min(|S|,|L|) = [0.5, 1, 1, 0.5]; opposite signs at positions 0 and 3 -> (0.5+0.5)/3
    assert ocr(s, low) == pytest.approx(1.0 / 3.0)
    sf, lf = s.flatten(), low.flatten()
    assert branch_cosine(s, low) == pytest.approx(float(sf @ lf / (sf.norm() * lf.norm())), rel=1e-6)


@pytest.mark.parametrize("storage", ["masked", "csr"])
@pytest.mark.parametrize("autocast", [False, True])
def test_recomputed_alignment_matches_autograd_of_the_norm(storage: str, autocast: bool) -> None:
    """The training form (difference recomputed in backward) has the reference's value and gradients."""
    grads = []
    for form in ("reference", "recomputed"):
        layer = make_layer("chtsl", 3, storage=storage)
        x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h = layer.lowrank_hidden(x)
            s, low = layer.sparse_branch(x), layer.lowrank_up(h)
            term = alignment_loss(s, low) if form == "reference" else layer_alignment(layer, x, h, s, low)
            (term * 3.0 + (s + low).float().square().mean()).backward()
        grads.append((term.detach(), x.grad, *(p.grad for p in layer.parameters())))
    for ref, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_recomputed_alignment_of_equal_branches_has_zero_gradient() -> None:
    layer = make_layer("chtsl", 0)
    x = torch.randn(3, 24)
    s = lowrank_branch(layer, x).detach().requires_grad_()
    low = s.detach().clone().requires_grad_()
    layer.sparse_branch = lambda _x: lowrank_branch(layer, _x)  # recompute gives the same equal branches
    layer_alignment(layer, x, layer.lowrank_hidden(x), s, low).backward()
    assert s.grad is not None and not s.grad.any() and not low.grad.any()


def test_recorder_collects_only_when_asked() -> None:
    layers = {"a": make_layer("chtsl", 1), "b": make_layer("chtsl", 2)}
    x = torch.randn(2, 3, 24)
    for layer in layers.values():  # nobody asks: nothing recorded, nothing kept
        layer(x)
        assert layer.recorder is None
    with record_branches(layers, align={"a"}, diagnostics=True) as rec:
        for layer in layers.values():
            layer(x)
    assert all(layer.recorder is None for layer in layers.values())
    expected = alignment_loss(layers["a"].sparse_branch(x), lowrank_branch(layers["a"], x))
    torch.testing.assert_close(rec.alignment(), expected)
    assert set(rec.ocr) == set(rec.cosine) == {"a", "b"}
    assert rec.ocr["b"] == pytest.approx(ocr(layers["b"].sparse_branch(x), lowrank_branch(layers["b"], x)))
    rec.alignment().backward()  # the alignment term carries gradients to both branches
    assert layers["a"].lora_A.grad is not None and layers["a"].weight.grad is not None
