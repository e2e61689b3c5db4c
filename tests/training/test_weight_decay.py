"""Weight decay with batch norm: Li & Arora's equivalence on BN-LeNet in float64 (with
weight decay vs. without it under their exponential schedule: the same losses and
normalized weights to float rounding), the growth factor's closed forms, and the trainer's
option to leave gamma/beta or the scale-invariant weights out of weight decay."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bnlab.data.loader import Loader
from bnlab.probes.spherical import scale_invariant_weights
from bnlab.training.models import build_model
from bnlab.training.train import TrainConfig, optimizer_for
from bnlab.training.weight_decay import (
    decay_groups,
    exactly_scale_invariant,
    li_arora_gap,
    li_arora_growth,
    li_arora_lr,
    li_arora_scheduler,
    norm_affine_parameters,
)
from bnlab.util.config import config_to_dict

LR, WEIGHT_DECAY, STEPS = 0.5, 0.05, 30


@pytest.fixture(scope="module")
def batches(synthetic_fashion) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = Loader(synthetic_fashion.train_images, synthetic_fashion.train_labels, 64, seed=0)
    out = []
    for epoch in (1, 2):  # 19 batches an epoch
        loader.set_epoch(epoch)
        out += [(x.double(), y) for x, y in loader]
    return out[:STEPS]


@pytest.fixture(scope="module")
def source_model() -> torch.nn.Module:
    """BN-LeNet in float64 with BN's eps at 1e-30 (``exactly_scale_invariant``)."""
    torch.manual_seed(0)
    return exactly_scale_invariant(build_model("bn-lenet", norm="bnlab"))


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_li_arora_weight_decay_equals_an_exponential_learning_rate(source_model, batches, momentum):
    before = copy.deepcopy(source_model.state_dict())
    gap = li_arora_gap(source_model, batches, LR, WEIGHT_DECAY, momentum)
    assert gap.steps == STEPS
    assert gap.loss < 1e-12 and gap.direction < 1e-13
    alpha = li_arora_growth(LR, WEIGHT_DECAY, momentum)
    assert gap.norm_ratio == pytest.approx(alpha ** -STEPS, rel=1e-12)  # w~_t = alpha^(-t) w_t
    assert alpha ** -STEPS > 2  # the weights did grow: the schedule is not a no-op here
    assert all(torch.equal(v, before[k]) for k, v in source_model.state_dict().items())


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_without_the_schedule_the_runs_differ(source_model, batches, momentum):
    assert li_arora_gap(source_model, batches, LR, WEIGHT_DECAY, momentum, schedule=False).direction > 1e-3


def test_with_momentum_the_initial_buffer_is_part_of_the_equivalence(source_model, batches):
    assert li_arora_gap(source_model, batches, LR, WEIGHT_DECAY, 0.5, prime=False).direction > 1e-6


def test_the_gap_needs_scale_invariant_weights(batches):
    with pytest.raises(ValueError, match="no scale-invariant weights"):
        li_arora_gap(build_model("bn-lenet", norm="none").double(), batches, LR, WEIGHT_DECAY)


def test_the_growth_factor_and_the_schedule() -> None:
    assert li_arora_growth(0.1, 5e-4) == pytest.approx(1 - 5e-5)
    for momentum in (0.5, 0.9):
        alpha = li_arora_growth(0.1, 5e-4, momentum)
        assert alpha ** 2 - (1 + momentum - 0.1 * 5e-4) * alpha + momentum == pytest.approx(0, abs=1e-15)
        assert momentum < alpha < 1  # the larger root
    assert li_arora_lr(0.1, 5e-4, 0.0, 0) == pytest.approx(0.1 / (1 - 5e-5))
    assert li_arora_lr(0.1, 5e-4, 0.0, 10) == pytest.approx(0.1 * (1 - 5e-5) ** -21)
    assert li_arora_growth(0.1, 0.0, 0.9) == pytest.approx(1.0)  # no weight decay: a constant rate
    with pytest.raises(ValueError, match="no positive real root"):
        li_arora_growth(0.5, 0.05, 0.9)  # (1 + mu - eta lambda)^2 < 4 mu


def test_the_schedule_refuses_an_optimizer_with_weight_decay() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, weight_decay=1e-4)
    with pytest.raises(ValueError, match="replaces weight decay"):
        li_arora_scheduler(optimizer, 1e-4)


# --------------------------------------------------------------------------- the trainer's option


def test_decay_groups_leave_out_what_they_are_told() -> None:
    model = build_model("bn-lenet", norm="bnlab")
    everything = decay_groups(model, 1e-3)
    assert len(everything) == 1 and len(everything[0]["params"]) == len(list(model.parameters()))
    norm = {id(p) for p in norm_affine_parameters(model)}
    invariant = {id(p) for _, p in scale_invariant_weights(model)}
    assert len(norm) == 8 and len(invariant) == 4
    for norm_decay, invariant_decay in [(False, True), (True, False), (False, False)]:
        groups = decay_groups(model, 1e-3, norm_decay, invariant_decay)
        decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
        assert sorted(decay_of) == sorted(id(p) for p in model.parameters())
        for p in model.parameters():
            off = (id(p) in norm and not norm_decay) or (id(p) in invariant and not invariant_decay)
            assert decay_of[id(p)] == (0.0 if off else 1e-3)


def test_group_and_layer_norm_affines_count_as_norm_parameters() -> None:
    assert len(norm_affine_parameters(build_model("bn-lenet", norm="group"))) == 8
    assert len(norm_affine_parameters(build_model("bn-lenet", norm="layer"))) == 8
    assert norm_affine_parameters(build_model("lenet", norm="none")) == []


def test_the_config_options_keep_earlier_configs_and_reach_the_optimizer() -> None:
    saved = config_to_dict(TrainConfig(val_size=200))
    assert "norm_weight_decay" not in saved and "invariant_weight_decay" not in saved
    config = TrainConfig(val_size=200, weight_decay=1e-3, norm_weight_decay=False)
    assert config_to_dict(config)["norm_weight_decay"] is False
    torch.manual_seed(0)
    model = build_model("bn-lenet", norm="bnlab")
    optimizer = optimizer_for(model, config)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert {decay_of[id(p)] for p in norm_affine_parameters(model)} == {0.0}
    assert {decay_of[id(p)] for _, p in scale_invariant_weights(model)} == {1e-3}
    default = optimizer_for(model, TrainConfig(val_size=200, weight_decay=1e-3))
    assert len(default.param_groups) == 1 and default.param_groups[0]["weight_decay"] == 1e-3


def test_decay_left_out_of_gamma_and_beta_leaves_them_alone_without_gradient() -> None:
    """With a zero loss gradient, only decayed parameters move (by the factor 1 - eta lambda)."""
    torch.manual_seed(0)
    model = build_model("bn-lenet", norm="bnlab")
    with torch.no_grad():
        for p in norm_affine_parameters(model):
            p.add_(0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = optimizer_for(model, TrainConfig(val_size=200, lr=0.1, weight_decay=0.5,
                                                 norm_weight_decay=False))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    norm = {id(p) for p in norm_affine_parameters(model)}
    for name, p in model.named_parameters():
        expected = before[name] if id(p) in norm else before[name] * (1 - 0.05)
        torch.testing.assert_close(p.detach(), expected)
    assert not math.isnan(sum(p.sum().item() for p in model.parameters()))
