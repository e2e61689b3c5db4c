"""Santurkar et al.'s noisy BN (bnlab.nn.noisy): plain BN at strength 0, a shift and scale per
unit re-drawn every step with small per-sample noise, its expectation in eval mode."""

from __future__ import annotations

import pytest
import torch

from bnlab import nn as bnn
from bnlab.nn.noisy import (
    JITTER,
    NoisyBatchNorm1d,
    NoisyBatchNorm2d,
    expected,
    noise_like,
    noisy,
    without_noise,
)
from bnlab.training.norms import create_norm_layer, parse_noise


@pytest.mark.parametrize("cls,shape", [(NoisyBatchNorm1d, (8, 4)), (NoisyBatchNorm2d, (8, 4, 3, 3))])
def test_noisy_bn_at_strength_zero_is_bn_exactly(cls, shape):
    x = torch.randn(*shape, dtype=torch.float64)
    plain = (bnn.BatchNorm2d if len(shape) == 4 else bnn.BatchNorm1d)(4).double()
    noisy_bn = cls(4, strength=0.0).double()
    with torch.no_grad():
        plain.weight.uniform_()
    noisy_bn.load_state_dict(plain.state_dict())
    rng = torch.get_rng_state()
    assert torch.equal(noisy_bn(x), plain(x))
    assert torch.equal(torch.get_rng_state(), rng)  # no noise drawn at all
    assert torch.equal(noisy_bn.running_mean, plain.running_mean)
    assert torch.equal(noisy_bn.running_var, plain.running_var)
    assert torch.equal(noisy_bn.eval()(x), plain.eval()(x))


def _moments_per_unit(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    per_unit = t.transpose(0, 1).flatten(1)  # (C, N * H * W)
    return per_unit.mean(dim=1), per_unit.std(dim=1)


@pytest.mark.parametrize("shape", [(4000, 300), (400, 300, 3, 3)])
def test_each_unit_gets_its_own_shift_and_scale_with_small_per_sample_noise(shape):
    torch.manual_seed(0)
    strength = 2.0
    y = torch.zeros(*shape, dtype=torch.float64)
    s, m = noise_like(y, strength)
    m_mean, m_sd = _moments_per_unit(m)  # (C,) this step's mu_t per unit, and the jitter
    s_mean, s_sd = _moments_per_unit(s)
    # mu_t ~ U(-S, S) and sigma_t ~ U(1, 1 + S) per unit: the spread over units of U(a, b).
    assert m_mean.abs().max() <= strength + 0.02 and m_mean.std() == pytest.approx(
        2 * strength / 12 ** 0.5, rel=0.15)
    assert s_mean.min() >= 1 - 0.02 and s_mean.max() <= 1 + strength + 0.02
    assert s_mean.std() == pytest.approx(strength / 12 ** 0.5, rel=0.15)
    # The per-sample noise within a unit is JITTER * S, small next to the units' shifts.
    assert m_sd.mean() == pytest.approx(JITTER * strength, rel=0.05)
    assert s_sd.mean() == pytest.approx(JITTER * strength, rel=0.05)
    # Independent per sample and activation: no correlation between two units' jitters.
    c = torch.corrcoef((m - m_mean[None, :, None, None] if m.dim() == 4 else m - m_mean)
                       .transpose(0, 1).flatten(1)[:20])
    assert (c - torch.eye(20, dtype=torch.float64)).abs().max() < 0.1


def test_the_layer_scope_draws_one_shift_for_all_units():
    torch.manual_seed(0)
    s, m = noise_like(torch.zeros(4000, 50, dtype=torch.float64), 1.0, scope="layer")
    m_mean, _ = _moments_per_unit(m)
    s_mean, _ = _moments_per_unit(s)
    assert m_mean.std() < 3 * JITTER / 4000 ** 0.5 and s_mean.std() < 3 * JITTER / 4000 ** 0.5
    with pytest.raises(ValueError, match="scope"):
        noise_like(m, 1.0, scope="sample")


def test_the_shift_moves_from_step_to_step_by_two_thirds_of_the_strength():
    """E|mu_t+1 - mu_t| = 2S/3 for mu ~ U(-S, S): what the ``ics`` calibration expects."""
    torch.manual_seed(0)
    layer = NoisyBatchNorm1d(200, strength=1.5).double()
    x = torch.randn(500, 200, dtype=torch.float64)
    with torch.no_grad():
        means = torch.stack([layer(x).mean(dim=0) for _ in range(60)])  # (60, 200)
    assert (means[1:] - means[:-1]).abs().mean().item() == pytest.approx(2 * 1.5 / 3, rel=0.05)


def test_eval_applies_the_expectation_of_the_distortion():
    torch.manual_seed(0)
    y = torch.randn(6, 3, dtype=torch.float64)
    draws = torch.stack([noisy(y, 2.0) for _ in range(20000)])  # (20000, 6, 3)
    assert torch.allclose(draws.mean(dim=0), expected(y, 2.0), atol=0.03)
    assert torch.equal(expected(y, 2.0), y * 2.0)
    layer = NoisyBatchNorm2d(3, strength=2.0).double()
    plain = bnn.BatchNorm2d(3).double()
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    layer.train()(x), plain.train()(x)  # the same running statistics
    assert torch.allclose(layer.eval()(x), 2.0 * plain.eval()(x))


def test_without_noise_gives_the_bn_output_and_restores_the_strength():
    model = torch.nn.Sequential(NoisyBatchNorm1d(4, strength=3.0), torch.nn.Sigmoid()).double()
    plain = bnn.BatchNorm1d(4).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    with without_noise(model):
        assert torch.equal(model[0](x), plain(x))
    assert model[0].strength == 3.0 and not torch.equal(model[0](x), plain(x))


def test_norm_names_parse_strength_and_scope():
    layer = create_norm_layer("noisy-bn:0.5", "conv", 3)
    assert isinstance(layer, NoisyBatchNorm2d) and (layer.strength, layer.scope) == (0.5, "unit")
    layer = create_norm_layer("noisy-bn:2:layer", "fc", 3)
    assert isinstance(layer, NoisyBatchNorm1d) and (layer.strength, layer.scope) == (2.0, "layer")
    assert create_norm_layer("noisy-bn", "fc", 3).strength == 1.0
    assert parse_noise("1:unit") == (1.0, "unit")
    for bad in ("-1", "abc", "1:sample", ""):
        with pytest.raises(ValueError, match="noisy-bn:STRENGTH"):
            parse_noise(bad)
