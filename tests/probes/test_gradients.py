"""Per-layer gradient norms: depth order, no side effects, and the vanishing-gradient mechanism."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlab.probes.gradients import (
    activation_stats,
    growth_per_layer,
    layer_gradient_norms,
    mean_field_growth,
)
from bnlab.training.deep import deep_mlp
from bnlab.training.models import build_model
from tests.helpers import buffers


def batch(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_one_entry_per_weight_layer_in_depth_order() -> None:
    model = deep_mlp(6, 16, norm="torch")
    names = [name for name, _ in layer_gradient_norms(model, *batch())]
    assert names == [f"block{i}.linear" for i in range(1, 6)] + ["head"]


def test_bn_lenet_order_is_conv_conv_linear_linear_linear() -> None:
    torch.manual_seed(0)
    model = build_model("bn-lenet", norm="bnlab")
    norms = layer_gradient_norms(model, *batch())
    modules = dict(model.named_modules())
    assert [type(modules[name]) for name, _ in norms] == [nn.Conv2d] * 2 + [nn.Linear] * 3
    declared = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [name for name, _ in norms] == declared
    assert all(norm > 0 for _, norm in norms)


@pytest.mark.parametrize("norm", ["bnlab", "torch"])
def test_buffers_and_grads_are_left_as_they_were(norm: str) -> None:
    torch.manual_seed(0)
    model = deep_mlp(4, 16, norm=norm).train()
    model.block1.linear.weight.grad = torch.full_like(model.block1.linear.weight, 7.0)
    before = buffers(model)
    layer_gradient_norms(model, *batch())
    activation_stats(model, batch()[0])
    for old, new in zip(before, model.buffers()):
        assert torch.equal(old, new)
    assert torch.equal(model.block1.linear.weight.grad, torch.full_like(model.block1.linear.weight, 7.0))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "block1.linear.weight")
    assert model.training


def test_sigmoid_gradients_vanish_with_depth_without_bn_and_not_with_bn() -> None:
    """The mechanism: each sigmoid scales the backward signal by at most 1/4, so 29 of them
    shrink the first layer's gradient by many orders of magnitude. BN divides each layer's
    pre-activation by its batch std, which restores the per-layer gain to about 1."""
    x, y = batch()
    torch.manual_seed(0)
    plain = dict(layer_gradient_norms(deep_mlp(30, 64, "sigmoid", "none"), x, y))
    torch.manual_seed(0)
    with_bn = dict(layer_gradient_norms(deep_mlp(30, 64, "sigmoid", "bnlab").train(), x, y))
    assert plain["block1.linear"] < 1e-3 * plain["head"]
    assert with_bn["block1.linear"] > 0.1 * with_bn["head"]


def test_activation_stats_one_row_per_activation_in_order() -> None:
    torch.manual_seed(0)
    stats = activation_stats(deep_mlp(5, 16, "sigmoid"), batch()[0])
    assert [name for name, _, _ in stats] == [f"block{i}.act" for i in range(1, 5)]
    assert all(0 < mean < 1 and std >= 0 for _, mean, std in stats)


def test_a_model_without_weight_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="expected a model with conv or linear layers"):
        layer_gradient_norms(nn.Sequential(nn.Flatten()), *batch())


@pytest.mark.parametrize("rate", [0.5, 1.0, 1.2112, 3.0])
def test_growth_fit_recovers_a_geometric_profile(rate: float) -> None:
    # index 0 = input side: a gradient that grows by `rate` per layer towards the input
    profile = [2.5 * rate ** (9 - layer) for layer in range(10)]
    assert growth_per_layer(profile) == pytest.approx(rate, rel=1e-12)


def test_growth_fit_is_least_squares_and_skips_underflow() -> None:
    # ln values 0, 1, 3 at 0, 1, 2: slope 1.5, so the factor towards the input is e^-1.5
    profile = [1.0, math.e, math.e ** 3]
    assert growth_per_layer(profile) == pytest.approx(math.exp(-1.5), rel=1e-12)
    assert growth_per_layer([*profile, 0.0, math.nan]) == pytest.approx(math.exp(-1.5), rel=1e-12)
    assert math.isnan(growth_per_layer([0.0, 1.0, math.inf]))


def test_mean_field_growth_closed_forms() -> None:
    assert mean_field_growth(torch.relu) == pytest.approx(math.pi / (math.pi - 1), rel=1e-7)
    assert mean_field_growth(lambda z: z) == pytest.approx(1.0, rel=1e-7)  # linear: no growth
    assert mean_field_growth(lambda z: 3 * z + 1) == pytest.approx(1.0, rel=1e-7)  # scale-free
    relu, tanh, sigmoid = (mean_field_growth(f) for f in (torch.relu, torch.tanh, torch.sigmoid))
    assert relu > tanh > sigmoid > 1.0


def test_a_wide_bn_relu_net_explodes_at_the_mean_field_rate() -> None:
    """Width 256, batch 512: near the theory's limit, the fitted factor is within 3% of
    sqrt(pi/(pi-1)) (1.21; a net without growth would give 1)."""
    torch.manual_seed(0)
    x, y = batch(512)
    norms = [v for _, v in layer_gradient_norms(deep_mlp(24, 256, "relu", "bnlab").train(), x, y)]
    measured = growth_per_layer(norms[1:-1])
    assert measured == pytest.approx(math.sqrt(math.pi / (math.pi - 1)), rel=0.03)
