"""Branch and skip variances per residual block (bnlab.probes.residual): calibrated on synthetic
blocks whose answer is known (a branch c * x; independent noise, normalized or not; a branch
that is off), then read on the CIFAR ResNets, without touching the model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlab.probes.residual import BlockVariance, channel_variance, residual_variances
from bnlab.training.resnet import cifar_resnet
from tests.helpers import buffers


class Block(nn.Module):
    """``branch(x) + x``: a residual block with an identity shortcut."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch, self.shortcut = branch, nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) + self.shortcut(x)


class Times(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c * x


class Noise(nn.Module):
    """Fresh standard normal noise of the input's shape, independent of it; ``relative``:
    times the input's overall standard deviation (a branch that preserves the variance)."""

    def __init__(self, relative: bool = False) -> None:
        super().__init__()
        self.relative = relative

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x)
        return noise * x.std() if self.relative else noise


def chain(branch, blocks: int) -> nn.Sequential:
    return nn.Sequential(*[Block(branch()) for _ in range(blocks)])


def unit_input(n: int = 8192, channels: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, generator=torch.Generator().manual_seed(seed))  # (N, C)


@pytest.mark.parametrize("c", [0.0, 0.5, 3.0])
def test_a_branch_of_c_times_its_input_reads_c_squared(c: float) -> None:
    x = unit_input(256)
    rows = residual_variances(chain(lambda: Times(c), 6), x)
    assert [r.index for r in rows] == list(range(1, 7)) and rows[0].name == "0"
    var = channel_variance(x)
    for r in rows:
        assert r.ratio == pytest.approx(c * c, rel=1e-12, abs=1e-300)
        assert r.skip == pytest.approx(var * (1 + c) ** (2 * (r.index - 1)), rel=1e-12)


def test_a_normalized_branch_adds_one_so_the_ratio_is_one_over_l() -> None:
    """De & Smith's BN case, known exactly: each branch outputs unit variance independent of
    its input (noise, batch-normalized), so the skip path's variance at block l is l and the
    ratio 1/l, to sampling error (N = 8192: about 1.6% on each variance)."""
    torch.manual_seed(0)
    rows = residual_variances(chain(lambda: nn.Sequential(
        Noise(), nn.BatchNorm1d(4, affine=False)), 40), unit_input())
    for r in rows:
        assert r.branch == pytest.approx(1.0, abs=1e-4)  # BN: exactly 1 up to eps
        assert r.skip == pytest.approx(r.index, rel=0.05)
        assert r.ratio * r.index == pytest.approx(1.0, rel=0.05)


def test_a_variance_preserving_branch_doubles_the_skip_variance() -> None:
    """The unnormalized case: a branch as large as its input, independent of it: the skip
    variance at block l is 2^(l - 1) and the ratio stays 1."""
    torch.manual_seed(0)
    rows = residual_variances(chain(lambda: Noise(relative=True), 30), unit_input())
    for r in rows:
        assert r.ratio == pytest.approx(1.0, rel=0.05)
        assert math.log2(r.skip) == pytest.approx(r.index - 1, abs=0.1 + 0.01 * r.index)


def test_a_branch_that_is_off_reads_zero_and_the_skip_variance_stays() -> None:
    x = unit_input(512)
    rows = residual_variances(chain(lambda: Times(0.0), 20), x)
    assert all(r.branch == 0.0 and r.ratio == 0.0 for r in rows)
    assert all(r.skip == pytest.approx(channel_variance(x), rel=1e-12) for r in rows)
    assert BlockVariance(1, "b", 0.0, 0.0).ratio != BlockVariance(1, "b", 0.0, 0.0).ratio  # nan
    assert BlockVariance(1, "b", 1.0, 0.0).ratio == math.inf


def test_float64_reads_depths_where_float32_overflows() -> None:
    """300 blocks of x + x: the variance is 4^299 = 2^598 at the last, beyond float32's 2^128."""
    x = unit_input(64)
    rows = residual_variances(chain(lambda: Times(1.0), 300), x)
    assert math.log2(rows[-1].skip) == pytest.approx(598 + math.log2(channel_variance(x)))
    assert all(r.ratio == pytest.approx(1.0, rel=1e-12) for r in rows)
    float32 = residual_variances(chain(lambda: Times(1.0), 300), x, dtype=torch.float32)
    assert not math.isfinite(float32[-1].skip)


def test_channel_variance_is_per_channel_over_batch_and_space() -> None:
    x = torch.randn(6, 3, 5, 5) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    expected = torch.stack([x[:, c].flatten().var(unbiased=False) for c in range(3)]).mean()
    assert channel_variance(x) == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"expected an \(N, C, ...\) tensor"):
        channel_variance(torch.ones(3))


def _batch(n: int = 32) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_resnet_with_bn_branches_add_one_and_the_ratio_falls_with_depth() -> None:
    """ResNet-56 at initialization in train mode: every branch ends in a BN, so its output has
    variance 1; within a stage the skip variance grows linearly (equal increments in the two
    halves of stage 1, each below the branch's 1: the ReLU after the sum cuts part of what the
    branch adds), so the ratio falls like 1/l; the model is left as it was."""
    torch.manual_seed(0)
    model = cifar_resnet(56, "bnlab").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = buffers(model)
    rows = residual_variances(model, _batch())
    assert len(rows) == 27 and rows[0].name == "stage1.block1"
    assert all(r.branch == pytest.approx(1.0, abs=1e-3) for r in rows)
    skip = [r.skip for r in rows[:9]]
    first, second = (skip[4] - skip[0]) / 4, (skip[8] - skip[4]) / 4  # per block
    assert 0.1 < first < 1 and 0.1 < second < 1 and 0.5 < first / second < 2
    assert rows[8].ratio < rows[0].ratio / 4
    assert model.training and all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_resnet_without_normalization_doubles_per_block_and_skipinit_is_off() -> None:
    torch.manual_seed(0)
    rows = residual_variances(cifar_resnet(56, "none").train(), _batch())
    per_block = math.log2(rows[-1].skip / rows[0].skip) / (len(rows) - 1)
    assert 0.7 < per_block < 1.5  # about 2^l
    assert all(r.ratio > 0.5 for r in rows)
    for residual in ("skipinit", "fixup"):
        rows = residual_variances(cifar_resnet(56, "none", residual=residual), _batch(8))
        assert all(r.branch == 0.0 and r.ratio == 0.0 for r in rows)


def test_a_model_without_residual_blocks_is_an_error() -> None:
    with pytest.raises(ValueError, match="expected a model with residual blocks"):
        residual_variances(nn.Sequential(nn.Linear(4, 4)), unit_input(8))
