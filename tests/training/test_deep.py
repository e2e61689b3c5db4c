"""Plain deep networks: exact depth, norm placement, parameter count, 110-layer passes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab import nn as bnn
from bnlab.training.deep import deep_cnn, deep_mlp


def weight_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.mark.parametrize("depth", [2, 3, 30, 110])
def test_deep_mlp_depth_counts_linear_layers(depth: int) -> None:
    model = deep_mlp(depth)
    layers = weight_layers(model)
    assert len(layers) == depth
    assert all(isinstance(layer, nn.Linear) for layer in layers)
    assert layers[0].in_features == 28 * 28 and layers[-1].out_features == 10


@pytest.mark.parametrize(("norm", "norm_params"), [("none", 0), ("torch", 2), ("layer", 2)])
def test_deep_mlp_parameter_count(norm: str, norm_params: int) -> None:
    depth, width, classes = 7, 32, 10
    model = deep_mlp(depth, width, norm=norm, num_classes=classes)
    expected = (784 * width + width + (depth - 2) * (width * width + width) + width * classes + classes
                + (depth - 1) * norm_params * width)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize(("norm", "norm_type"),
                         [("none", nn.Identity), ("bnlab", bnn.BatchNorm1d), ("torch", nn.BatchNorm1d),
                          ("layer", nn.LayerNorm), ("group", nn.GroupNorm)])
@pytest.mark.parametrize(("activation", "activation_type"), [("sigmoid", nn.Sigmoid), ("relu", nn.ReLU)])
def test_deep_mlp_block_is_linear_norm_activation(norm: str, norm_type: type, activation: str,
                                                  activation_type: type) -> None:
    model = deep_mlp(5, 16, activation, norm)
    names = [name for name, _ in model.named_children()]
    assert names == ["flatten", "block1", "block2", "block3", "block4", "head"]
    for index in range(1, 5):
        block = getattr(model, f"block{index}")
        assert [type(m) for m in block] == [nn.Linear, norm_type, activation_type]


def test_deep_mlp_initialization_is_the_standard_one_per_activation() -> None:
    torch.manual_seed(0)
    sigmoid_weight = deep_mlp(3, 256, "sigmoid").block2.linear.weight  # (256, 256)
    relu_weight = deep_mlp(3, 256, "relu").block2.linear.weight
    assert sigmoid_weight.std().item() == pytest.approx(math.sqrt(2 / (256 + 256)), rel=0.05)  # Xavier
    assert relu_weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)  # Kaiming fan-in
    assert deep_mlp(3, 8).block1.linear.bias.abs().sum().item() == 0


@pytest.mark.parametrize("norm", ["none", "bnlab", "torch"])
def test_depth_110_forward_and_backward(norm: str) -> None:
    torch.manual_seed(0)
    model = deep_mlp(110, 64, "sigmoid", norm).train()
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    logits = model(x)  # (32, 10)
    assert logits.shape == (32, 10)
    F.cross_entropy(logits, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("norm", ["none", "torch"])
def test_deep_cnn_depth_downsampling_and_backward(norm: str) -> None:
    torch.manual_seed(0)
    model = deep_cnn(10, channels=4, norm=norm)
    layers = weight_layers(model)
    assert len(layers) == 10 and isinstance(layers[-1], nn.Linear)
    assert sorted(layer.stride[0] for layer in layers[:-1]) == [1] * 7 + [2, 2]
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), y).backward()
    assert torch.isfinite(layers[0].weight.grad).all()


def test_invalid_architectures_say_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"expected depth >= 2 .*\(got 1\)"):
        deep_mlp(1)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        deep_mlp(3, activation="swish")
    with pytest.raises(ValueError, match="unknown norm"):
        deep_cnn(3, norm="batch")
