"""The ReLU networks of the landscape claim: the small VGG's layout and ReLU-LeNet's, both
He-initialized, with the norm the only difference between the two arms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlab import nn as bnn
from bnlab.training.models import build_model, norm_layers
from bnlab.training.train import TrainConfig
from bnlab.training.vgg import CHANNELS, FC, small_vgg


def weight_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_small_vgg_layout_and_shapes():
    model = small_vgg("none")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [CHANNELS, 2 * CHANNELS, 2 * CHANNELS, 4 * CHANNELS]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    x = torch.rand(5, 1, 28, 28)
    assert model(x).shape == (5, 10)
    assert model[:-2](x).shape == (5, 4 * CHANNELS * 3 * 3)  # flattened after the third pool
    assert model[:-1](x).shape == (5, FC)  # fc1, before the head


@pytest.mark.parametrize("name", ["small-vgg", "relu-lenet"])
def test_relu_nets_differ_only_by_the_norm(name):
    torch.manual_seed(0)
    plain = build_model(name, "none")
    torch.manual_seed(0)
    with_bn = build_model(name, "bnlab", fuse_activation=False)
    assert not norm_layers(plain)
    assert len(norm_layers(with_bn)) == len(weight_layers(with_bn)) - 1  # all but the head
    assert all(isinstance(m, bnn.BatchNorm1d | bnn.BatchNorm2d) for _, m in norm_layers(with_bn))
    for a, b in zip(weight_layers(plain), weight_layers(with_bn), strict=True):
        assert torch.equal(a.weight, b.weight)  # the same draws: the norm draws nothing
    assert any(isinstance(m, nn.ReLU) for m in plain.modules())
    assert not any(isinstance(m, nn.Sigmoid) for m in plain.modules())


@pytest.mark.parametrize("name", ["small-vgg", "relu-lenet"])
def test_relu_nets_are_he_initialized(name):
    torch.manual_seed(0)
    for layer in weight_layers(build_model(name, "none")):
        fan_in = layer.weight[0].numel()
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.25)
        assert layer.bias.abs().sum().item() == 0


def test_relu_lenet_names_its_norm_layers_after_the_slots():
    names = [name for name, _ in norm_layers(build_model("relu-lenet", "bnlab"))]
    assert names == ["conv1", "conv2", "fc1", "fc2"]
    assert [n for n, _ in norm_layers(build_model("small-vgg", "bnlab"))] == [
        "conv1.norm", "conv2.norm", "conv3.norm", "conv4.norm", "fc1.norm"]


@pytest.mark.parametrize("name", ["small-vgg", "relu-lenet"])
def test_relu_nets_are_models_of_the_config(name):
    assert TrainConfig(model=name, norm="none").model == name
    with pytest.raises(ValueError, match="takes only"):
        TrainConfig(model=name, norm="bnlab", depth=3)
