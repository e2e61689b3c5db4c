"""The norm registry: every entry builds, and layer/group/instance normalize per sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.training.norms import NORMS, create_norm_layer, group_count
from tests.helpers import NORM_SKIPS

SHAPES = {"conv": (8, 6, 5, 5), "fc": (8, 12)}
PER_SAMPLE = ("layer", "group", "instance")


def randomize_affine(layer: nn.Module, seed: int = 0) -> None:
    """Give gamma/beta non-trivial values so a comparison also checks the affine."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize("name", [pytest.param(n, marks=NORM_SKIPS[n]) if n in NORM_SKIPS else n
                                  for n in sorted(NORMS)])
def test_every_norm_builds_and_preserves_shape(name: str, kind: str) -> None:
    x = torch.randn(SHAPES[kind])
    layer = create_norm_layer(name, kind, SHAPES[kind][1])
    for mode in (True, False):
        layer.train(mode)
        assert layer(x).shape == x.shape
    assert NORMS[name].description


def test_layer_norm_on_conv_is_per_sample_normalization_over_c_h_w() -> None:
    x = torch.randn(4, 6, 5, 7) * 3 + 1
    layer = create_norm_layer("layer", "conv", 6)
    expected = F.layer_norm(x, x.shape[1:], eps=layer.eps)  # no affine: identity
    torch.testing.assert_close(layer(x), expected)
    manual = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / torch.sqrt(
        x.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + layer.eps)
    torch.testing.assert_close(layer(x), manual, atol=1e-5, rtol=1e-5)


def test_layer_norm_on_fc_is_torch_layer_norm() -> None:
    layer = create_norm_layer("layer", "fc", 12)
    assert isinstance(layer, nn.LayerNorm) and layer.normalized_shape == (12,)


@pytest.mark.parametrize(("channels", "groups"),
                         [(6, 3), (16, 4), (120, 4), (84, 4), (64, 4), (128, 4), (8, 4), (7, 1), (2, 1)])
def test_group_count_rule(channels: int, groups: int) -> None:
    assert group_count(channels) == groups
    assert channels % groups == 0


def test_group_norm_gives_zero_mean_unit_variance_per_sample_and_group() -> None:
    x = torch.randn(4, 16, 6, 6) * 5 - 2
    y = create_norm_layer("group", "conv", 16)(x)  # affine is identity at init
    grouped = y.reshape(4, group_count(16), -1)  # (N, G, C/G * H * W)
    torch.testing.assert_close(grouped.mean(-1), torch.zeros(4, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped.var(-1, unbiased=False), torch.ones(4, 4), atol=1e-3, rtol=0)


def test_instance_norm_gives_zero_mean_unit_variance_per_sample_and_channel() -> None:
    x = torch.randn(4, 6, 8, 8) * 5 - 2
    layer = create_norm_layer("instance", "conv", 6)
    assert isinstance(layer, nn.InstanceNorm2d) and layer.affine and not layer.track_running_stats
    y = layer(x).flatten(2)  # (N, C, H*W)
    torch.testing.assert_close(y.mean(-1), torch.zeros(4, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(4, 6), atol=1e-3, rtol=0)


def test_instance_norm_on_fc_falls_back_to_layer_norm() -> None:
    assert isinstance(create_norm_layer("instance", "fc", 12), nn.LayerNorm)
    assert "layer norm" in NORMS["instance"].description


def output_of_first_sample(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(x)[0]


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize("name", PER_SAMPLE)
def test_per_sample_norms_do_not_depend_on_the_batch_or_the_mode(name: str, kind: str) -> None:
    x = torch.randn(SHAPES[kind])
    other_batch = x.clone()
    other_batch[1:] = torch.randn_like(x[1:]) * 4 + 3  # same first sample, different others
    layer = create_norm_layer(name, kind, SHAPES[kind][1])
    randomize_affine(layer)
    layer.train()
    in_train = output_of_first_sample(layer, x)
    torch.testing.assert_close(output_of_first_sample(layer, other_batch), in_train)
    layer.eval()
    torch.testing.assert_close(output_of_first_sample(layer, x), in_train)
    torch.testing.assert_close(output_of_first_sample(layer, other_batch), in_train)


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize("name", ["bnlab", "torch"])
def test_batch_norm_does_depend_on_the_batch_and_the_mode(name: str, kind: str) -> None:
    x = torch.randn(SHAPES[kind])
    other_batch = x.clone()
    other_batch[1:] = torch.randn_like(x[1:]) * 4 + 3
    layer = create_norm_layer(name, kind, SHAPES[kind][1]).train()
    in_train = output_of_first_sample(layer, x)
    assert not torch.allclose(output_of_first_sample(layer, other_batch), in_train, atol=1e-3)
    layer.eval()
    assert not torch.allclose(output_of_first_sample(layer, x), in_train, atol=1e-3)


def test_unknown_norm_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown norm 'batch'.*'group'"):
        create_norm_layer("batch", "fc", 4)
