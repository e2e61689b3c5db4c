"""Batch norm and weight decay, measured: scale invariance of a weight feeding a BN (float64),
which weights are scale-invariant, the angle read from known rotations, the equilibrium
predictions read back from a simulated spherical motion (with and without weight decay),
and a monitored training run that ends exactly as an unmonitored one."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab import nn as bnn
from bnlab.probes.spherical import (
    SphericalMotionMonitor,
    angle,
    effective_lr,
    equilibrium_angular_update,
    equilibrium_weight_norm,
    scale_invariant_weights,
    simulate_spherical_motion,
    weight_layers,
)
from bnlab.training.deep import deep_mlp
from bnlab.training.models import build_model
from bnlab.training.train import TrainConfig, start_run
from bnlab.util.errors import ConfigError

TINY_EPS = 1e-30
"""BN's eps is the one thing that breaks scale invariance (BN_eps(c h) = BN_{eps/c^2}(h));
1e-30 vanishes next to any variance in float64."""


def conv_bn_model(bn: type[nn.Module], eps: float = TINY_EPS) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), bn(4, eps=eps), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3)).double().train()


@pytest.mark.parametrize("bn", [bnn.BatchNorm2d, nn.BatchNorm2d], ids=["bnlab", "torch"])
@pytest.mark.parametrize("c", [0.01, 0.5, 3.0, 100.0])
def test_loss_and_bn_outputs_do_not_change_when_the_conv_weight_is_scaled(bn, c) -> None:
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(8) % 3

    def run(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bn_out = model[1](model[0](x))  # (8, 4, 6, 6)
        loss = F.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, model[0].weight)
        return bn_out.detach(), loss.detach(), grad

    model = conv_bn_model(bn)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[0].weight.mul_(c)
    bn_out, loss, grad = run(model)
    bn_scaled, loss_scaled, grad_scaled = run(scaled)
    torch.testing.assert_close(bn_scaled, bn_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_scaled, loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(grad_scaled, grad / c, rtol=1e-10, atol=1e-14 / c)
    # Euler's identity for a scale-invariant loss: the gradient is orthogonal to the weight.
    assert abs((grad * model[0].weight).sum()) < 1e-13 * grad.norm() * model[0].weight.norm()


def test_eps_is_what_breaks_it_exactly_as_a_rescaled_eps() -> None:
    """With BN's usual eps, scaling the weight by c is BN with eps / c^2: the deviation
    from invariance is exactly eps's."""
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64)
    model = conv_bn_model(bnn.BatchNorm2d, eps=1e-5)
    h = model[0](x).detach()
    c = 0.05
    rescaled_eps = bnn.BatchNorm2d(4, eps=1e-5 / c ** 2).double().train()
    torch.testing.assert_close(model[1](c * h), rescaled_eps(h), rtol=1e-12, atol=1e-12)
    assert (model[1](c * h) - model[1](h)).abs().max() > 1e-4  # not invariant with this eps


def test_scale_invariant_weights_of_the_lab_s_models() -> None:
    bn_lenet = build_model("bn-lenet", norm="bnlab")
    names = [name for name, _ in scale_invariant_weights(bn_lenet)]
    weight_layers = [name for name, m in bn_lenet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert names == [f"{name}.weight" for name in weight_layers[:4]]  # all but the head
    assert len(scale_invariant_weights(build_model("bn-lenet", norm="bnlab", norm_slots="conv"))) == 2
    assert len(scale_invariant_weights(build_model("bn-lenet", norm="ghost:4"))) == 4
    assert len(scale_invariant_weights(
        build_model("bn-lenet", norm="bnlab", dropout=0.3, dropout_order="before"))) == 4
    assert len(scale_invariant_weights(deep_mlp(5, 8, norm="bnlab"))) == 4
    for norm in ("none", "group", "layer", "frozen", "renorm"):
        assert scale_invariant_weights(build_model("bn-lenet", norm=norm)) == [], norm


def orthonormal_pair(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    return q[:, 0], q[:, 1]


@pytest.mark.parametrize("theta", [1e-7, 1e-3, 0.5, 3.0])
def test_the_angle_of_a_known_rotation(theta) -> None:
    u, v = orthonormal_pair(1000, 0)
    w = 3.0 * u
    rotated = 3.0 * (math.cos(theta) * u + math.sin(theta) * v)
    assert angle(w, rotated) == pytest.approx(theta, rel=1e-9)
    assert angle(w, 5.0 * w) == pytest.approx(0.0, abs=1e-15)
    assert angle(w, -w) == pytest.approx(math.pi)


def test_the_monitor_reads_a_known_angular_update_and_zero_for_a_constant_weight() -> None:
    u, v = orthonormal_pair(50, 1)
    weight = nn.Parameter(u.clone())
    lr, theta = 0.1, 0.02
    optimizer = torch.optim.SGD([weight], lr=lr)
    monitor = SphericalMotionMonitor([("w", weight)]).attach(optimizer)
    weight.grad = -(math.tan(theta) / lr) * v  # w + tan(theta) v: rotated by theta
    optimizer.step()
    weight.grad = torch.zeros_like(weight)  # a constant weight
    optimizer.step()
    first, second = monitor.steps
    assert first["angle"] == pytest.approx(theta, rel=1e-9)
    assert first["norm"] == pytest.approx(1.0) and first["effective_lr"] == pytest.approx(lr)
    assert first["unit_grad_sq"] == pytest.approx((math.tan(theta) / lr) ** 2)
    assert second["angle"] == 0.0 and second["norm"] == pytest.approx(1 / math.cos(theta))
    monitor.detach()
    optimizer.step()
    assert len(monitor.steps) == 2


def test_pure_shrinking_by_weight_decay_is_no_angular_update() -> None:
    weight = nn.Parameter(torch.ones(10, dtype=torch.float64))
    optimizer = torch.optim.SGD([weight], lr=0.1, weight_decay=0.5)
    monitor = SphericalMotionMonitor([("w", weight)]).attach(optimizer)
    weight.grad = torch.zeros_like(weight)
    optimizer.step()
    optimizer.step()
    assert [r["angle"] for r in monitor.steps] == pytest.approx([0.0, 0.0], abs=1e-15)
    assert monitor.steps[1]["norm"] == pytest.approx(math.sqrt(10) * 0.95)
    assert monitor.steps[1]["weight_decay"] == 0.5


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_the_equilibrium_predictions_on_a_simulated_spherical_motion(momentum) -> None:
    lr, weight_decay, unit_grad_sq = 0.5, 0.01, 2.0
    monitor = simulate_spherical_motion(lr, weight_decay, momentum, 3000, unit_grad_sq)
    last = monitor.epochs[-1]  # steps 2500..2999: dozens of time constants 1 / (2 eta lambda)
    assert last["steps"] == 500 and last["mean_unit_grad_sq"] == pytest.approx(unit_grad_sq)
    assert last["predicted_angle"] == pytest.approx(math.sqrt(2 * lr * weight_decay / (1 + momentum)))
    assert last["mean_angle"] == pytest.approx(last["predicted_angle"], rel=0.03)
    assert last["norm"] == pytest.approx(last["predicted_norm"], rel=0.03)
    assert last["mean_effective_lr"] == pytest.approx(last["predicted_effective_lr"], rel=0.06)
    first = monitor.steps[0]  # from a small start: the angle is far above its equilibrium
    assert first["angle"] > 2 * last["predicted_angle"]


def test_without_weight_decay_there_is_no_equilibrium() -> None:
    monitor = simulate_spherical_motion(0.5, 0.0, 0.0, 3000)
    first, last = monitor.epochs[0], monitor.epochs[-1]
    assert last["predicted_angle"] == 0.0 and last["predicted_norm"] == math.inf
    assert last["predicted_effective_lr"] == 0.0
    assert last["norm"] > 1.5 * first["norm"] and last["mean_angle"] < 0.7 * first["mean_angle"]
    # ||w||^2 grows by eta^2 L / ||w||^2 per step exactly: ||w||^4 grows linearly, by 2 eta^2 L.
    norms = [r["norm"] for r in monitor.steps]
    assert norms[-1] ** 4 - norms[1000] ** 4 == pytest.approx(2 * 0.25 * 1999, rel=0.01)


def test_closed_forms_of_the_predictions() -> None:
    assert effective_lr(0.1, 2.0) == pytest.approx(0.025)
    assert equilibrium_angular_update(0.1, 5e-4) == pytest.approx(0.01)
    # Without momentum: the fixed point of ||w||^2 = (1 - eta lambda)^2 ||w||^2 + eta^2 L / ||w||^2.
    norm = equilibrium_weight_norm(0.1, 5e-4, 0.0, 3.0)
    assert norm ** 2 == pytest.approx((1 - 5e-5) ** 2 * norm ** 2 + 0.01 * 3.0 / norm ** 2)


def test_a_monitored_run_ends_exactly_as_an_unmonitored_one(synthetic_fashion) -> None:
    config = TrainConfig(val_size=200, epochs=2, subset=300, batch_size=64, lr=0.2, momentum=0.9,
                         weight_decay=5e-3, device="cpu")
    plain = start_run(config, synthetic_fashion, progress=False)
    plain.train()
    monitored = start_run(config, synthetic_fashion, progress=False)
    monitor = SphericalMotionMonitor(scale_invariant_weights(monitored.model))
    monitor.attach(monitored.optimizer)
    monitored.observer = monitor
    monitored.train()
    assert monitored.history[-1]["val_loss"] == plain.history[-1]["val_loss"]
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                 monitored.model.state_dict().values()))
    steps = len(monitored.train_loader)
    assert len(monitor.steps) == 2 * steps * 4
    assert [(r["epoch"], r["steps"]) for r in monitor.epochs] == [(1, steps)] * 4 + [(2, steps)] * 4
    row = monitor.epochs[-1]
    assert row["weight_decay"] == 5e-3 and row["momentum"] == 0.9 and row["lr"] == 0.2
    assert 0 < row["mean_angle"] < 1 and row["predicted_angle"] == pytest.approx(
        math.sqrt(2 * 0.2 * 5e-3 / 1.9))


def test_the_monitor_refuses_what_it_cannot_measure() -> None:
    with pytest.raises(ValueError, match="no weights"):
        SphericalMotionMonitor([])
    weight = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="does not train"):
        SphericalMotionMonitor([("w", weight)]).attach(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=1))


def test_windows_summarize_consecutive_steps_and_forget_them() -> None:
    u, v = orthonormal_pair(20, 2)
    weight = nn.Parameter(u.clone())
    optimizer = torch.optim.SGD([weight], lr=0.1)
    monitor = SphericalMotionMonitor([("w", weight)]).attach(optimizer)
    thetas = [0.01, 0.03, 0.02, 0.05, 0.04]
    for theta in thetas:  # rotate by theta in the plane of w and v, keeping the norm
        w = weight.detach()
        target = w.norm() * (math.cos(theta) * w / w.norm() + math.sin(theta) * v)
        weight.grad = (w - target) / 0.1
        optimizer.step()
        v = v - (v @ weight.detach()) / weight.detach().norm() ** 2 * weight.detach()
        v = v / v.norm()
    windows = monitor.take_windows(3, 2, first_step=10, invariant=frozenset({"w"}))
    assert [(r["window"], r["first_step"], r["steps"]) for r in windows] == [
        (0, 10, 2), (1, 12, 2), (2, 14, 1)]
    for r, expected in zip(windows, ([0.01, 0.03], [0.02, 0.05], [0.04])):
        assert r["mean_angle"] == pytest.approx(sum(expected) / len(expected), rel=1e-6)
        assert r["epoch"] == 3 and r["invariant"] and r["layer"] == "w"
    assert monitor.steps == [] and monitor.take_windows(4, 2) == []
    with pytest.raises(ValueError, match="every >= 1"):
        monitor.take_windows(4, 0)


def test_weight_layers_are_every_conv_and_linear_weight_with_or_without_batch_norm() -> None:
    for norm in ("bnlab", "none"):
        model = build_model("bn-lenet", norm=norm)
        names = [name for name, _ in weight_layers(model)]
        assert len(names) == 5 and all(name.endswith(".weight") for name in names)
    bn = build_model("bn-lenet", norm="bnlab")
    assert [n for n, _ in scale_invariant_weights(bn)] == [n for n, _ in weight_layers(bn)][:4]


def _recorded(config: TrainConfig, dataset, run_dir=None, resume=False):
    run = start_run(config, dataset, run_dir, resume=resume, progress=False)
    run.train()
    return run


@pytest.mark.parametrize("norm", ["bnlab", "none"])
def test_a_run_records_windows_of_every_weight_and_ends_as_an_unrecorded_run(
        synthetic_fashion, norm) -> None:
    base = TrainConfig(val_size=200, epochs=2, subset=300, batch_size=64, lr=0.2, momentum=0.9,
                       weight_decay=5e-3, norm=norm, device="cpu")
    plain = _recorded(base, synthetic_fashion)
    recorded = _recorded(TrainConfig(**{**base.__dict__, "spherical_every": 2}), synthetic_fashion)
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                 recorded.model.state_dict().values()))
    assert [r["val_loss"] for r in recorded.history] == [r["val_loss"] for r in plain.history]
    assert all("spherical" not in r for r in plain.history)
    steps = len(recorded.train_loader)  # 5 a epoch: windows of 2, 2 and 1
    for epoch, row in enumerate(recorded.history, start=1):
        windows = row["spherical"]
        assert len(windows) == 3 * 5
        assert [w["first_step"] for w in windows[::5]] == [(epoch - 1) * steps + k for k in (0, 2, 4)]
        assert sum(w["steps"] for w in windows[:5]) == 2 * 5
        assert [w["invariant"] for w in windows[:5]] == [norm == "bnlab"] * 4 + [False]
        assert all(0 < w["mean_angle"] < 1 and w["lr"] == 0.2 for w in windows)
        assert windows[0]["predicted_angle"] == pytest.approx(math.sqrt(2 * 0.2 * 5e-3 / 1.9))


def test_a_resumed_recorded_run_keeps_the_windows_of_an_uninterrupted_one(synthetic_fashion,
                                                                           tmp_path) -> None:
    config = TrainConfig(val_size=200, epochs=3, subset=300, batch_size=64, weight_decay=1e-3,
                         spherical_every=3, device="cpu")
    whole = _recorded(config, synthetic_fashion, tmp_path / "whole")
    part = start_run(config, synthetic_fashion, tmp_path / "cut", progress=False)
    part.train_next_epoch()
    resumed = _recorded(config, synthetic_fashion, tmp_path / "cut", resume=True)
    assert [r["spherical"] for r in resumed.history] == [r["spherical"] for r in whole.history]


def test_recording_needs_every_weight_to_train() -> None:
    with pytest.raises(ConfigError, match="spherical_every"):
        TrainConfig(val_size=200, train_only="bn", spherical_every=5)
    with pytest.raises(ConfigError, match="spherical_every"):
        TrainConfig(val_size=200, spherical_every=-1)
