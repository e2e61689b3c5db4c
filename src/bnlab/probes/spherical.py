"""Batch norm and weight decay, measured: weight norms, effective learning rates and the
angular update of scale-invariant weights, against their equilibrium predictions.

Why: a weight ``w`` whose output goes straight into a batch norm does not change the
loss when it is rescaled, ``L(c w) = L(w)`` for c > 0 (in training mode). Then its
gradient is orthogonal to it and scales as ``1/c``, so weight decay does not regularize
it: it only shrinks ``||w||`` and so raises the *effective learning rate* ``eta / ||w||^2``
(van Laarhoven 2017, "L2 regularization versus batch and weight normalization"; Hoffer
et al. 2018, "Norm matters"). Gradient steps push ``||w||`` up, weight decay pulls it down,
and the two settle at an equilibrium (Wan et al., NeurIPS 2021, "Spherical motion
dynamics: learning dynamics of normalized neural network using SGD and weight decay").

Measured per step, per scale-invariant weight (:class:`SphericalMotionMonitor`):

* ``norm``: ``||w_t||``;
* ``effective_lr``: ``eta / ||w_t||^2``;
* ``angle``: the angular update, the angle between ``w_t`` and ``w_{t+1}`` (radians);
* ``unit_grad_sq``: ``||w_t||^2 ||g_t||^2 = ||g~_t||^2``, the squared norm of the loss
  gradient at the unit-norm weight ``w_t / ||w_t||`` (scale invariance: ``g~ = ||w|| g``).

Predicted at equilibrium, for SGD with learning rate eta, weight decay lambda and
momentum mu (torch's SGD: ``v <- mu v + g + lambda w``, ``w <- w - eta v``):

* angular update ``sqrt(2 eta lambda / (1 + mu))``: Wan et al. 2021 (their theorem on the
  angular update in equilibrium); ``sqrt(2 eta lambda)`` without momentum;
* weight norm ``||w||^4 = eta L / (lambda (1 - mu) (2 - eta lambda / (1 + mu)))`` with
  ``L = E ||g~||^2``, under Wan et al.'s assumptions (``L`` constant, gradients orthogonal
  to ``w`` and uncorrelated from step to step). Without momentum it is the fixed point of
  ``E||w_{t+1}||^2 = (1 - eta lambda)^2 ||w_t||^2 + eta^2 L / ||w_t||^2`` exactly; with
  momentum, the same steady state (``tests/probes/test_spherical.py`` simulates that
  motion on a sphere and reads both predictions back);
* effective learning rate ``eta / ||w||^2`` at that norm.

With lambda = 0 there is no equilibrium: the angle's prediction is 0 and the norm's
infinite (``||w||`` grows without bound).

Which weights are scale-invariant (:func:`scale_invariant_weights`): the weight of a
conv or linear layer whose output goes into a batch norm that normalizes by its input's
own statistics (bnlab's and torch's, ghost, noisy; dropout in between is allowed), not
batch renorm (it mixes in the running statistics) nor frozen batch norm. The bias of
such a layer is removed by the batch norm's mean, so the weight alone is invariant.
Group and layer norm normalize over several channels, so a per-channel bias is not
removed: there, weight and bias together are invariant, not the weight alone, and such
weights are not listed.

The monitor is an observer of a training run (``bnlab.training.train.TrainingRun``): it
hooks the optimizer's step (``Optimizer.register_step_pre_hook``/``_post_hook``), copies
the tracked weights before each step and measures after it, all under ``no_grad`` and
drawing no random numbers, so a monitored run ends with exactly the numbers of an
unmonitored one. ``epoch_end`` (the ``TrainingRun`` observer call) closes an epoch;
``take_windows`` summarizes an epoch's steps in windows of a few steps each, which is what a
training run records with ``TrainConfig.spherical_every`` (for every conv/linear weight,
:func:`weight_layers`, so that a model without batch norm is measured the same way).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bnlab.nn import BatchRenorm1d, BatchRenorm2d, is_batch_norm

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
"""Layers between a weight layer and its batch norm that keep the weight scale-invariant
(a mask scaled by a constant commutes with rescaling)."""


def _normalizes_by_batch_statistics(module: nn.Module) -> bool:
    return is_batch_norm(module) and not isinstance(module, (BatchRenorm1d, BatchRenorm2d))


def scale_invariant_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every conv/linear weight whose output goes into a batch norm that
    normalizes by its input's statistics (see the module docstring), in model order."""
    # A batch norm fused with its activation (bnlab.nn.BatchNormAct) holds the activation as a
    # child: it is a leaf here all the same.
    leaves = [(name, m) for name, m in model.named_modules()
              if not list(m.children()) or is_batch_norm(m)]
    out = []
    for index, (name, module) in enumerate(leaves):
        if not isinstance(module, WEIGHT_LAYERS):
            continue
        following = (m for _, m in leaves[index + 1:] if not isinstance(m, PASS_THROUGH))
        if _normalizes_by_batch_statistics(next(following, nn.Identity())):
            out.append((f"{name}.weight" if name else "weight", module.weight))
    return out


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every conv/linear layer, in model order: what the monitor follows in
    a model with or without batch norm (the :func:`scale_invariant_weights` are among them)."""
    return [(f"{name}.weight" if name else "weight", m.weight) for name, m in model.named_modules()
            if isinstance(m, WEIGHT_LAYERS)]


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """The angle (radians, in [0, pi]) between two tensors seen as vectors, computed as
    ``2 atan2(||a^ - b^||, ||a^ + b^||)`` with ``a^ = a / ||a||``: accurate for tiny angles,
    where ``arccos`` of the cosine loses half the digits."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    a, b = a / a.norm(), b / b.norm()
    return 2 * math.atan2((a - b).norm().item(), (a + b).norm().item())


def effective_lr(lr: float, norm: float) -> float:
    """``eta / ||w||^2``: the learning rate of the direction ``w / ||w||``."""
    return lr / norm ** 2


def equilibrium_angular_update(lr: float, weight_decay: float, momentum: float = 0.0) -> float:
    """``sqrt(2 eta lambda / (1 + mu))`` (Wan et al. 2021); 0 without weight decay."""
    return math.sqrt(2 * lr * weight_decay / (1 + momentum))


def equilibrium_weight_norm(lr: float, weight_decay: float, momentum: float,
                            unit_grad_sq: float) -> float:
    """``(eta L / (lambda (1 - mu) (2 - eta lambda / (1 + mu))))^(1/4)`` with
    ``L = unit_grad_sq = E||g~||^2`` (module docstring); inf without weight decay."""
    if weight_decay == 0:
        return math.inf
    denominator = weight_decay * (1 - momentum) * (2 - lr * weight_decay / (1 + momentum))
    return (lr * unit_grad_sq / denominator) ** 0.25


class SphericalMotionMonitor:
    """Per-step measurements of ``weights`` (``[(name, parameter)]``, default: pass
    :func:`scale_invariant_weights` of the model) while an optimizer trains them.

    ``attach(optimizer)`` starts measuring (``detach()`` stops); every step appends one
    record per weight to :attr:`steps`: ``{"step", "layer", "norm", "effective_lr",
    "angle", "unit_grad_sq", "lr", "weight_decay", "momentum"}`` (the optimizer's settings
    for that parameter at that step; ``norm`` is before the step). ``epoch_end`` (the
    ``TrainingRun`` observer call) appends one summary per weight to :attr:`epochs`:
    the epoch's mean angle and effective learning rate, the norm before its last step,
    ``mean_unit_grad_sq``, and the equilibrium predictions of the epoch's settings.
    """

    def __init__(self, weights: list[tuple[str, nn.Parameter]]) -> None:
        if not weights:
            raise ValueError("no weights to monitor (a model without scale-invariant weights?)")
        self.weights = list(weights)
        self.steps: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self._handles: list[RemovableHandle] = []
        self._groups: list[dict[str, Any]] = []
        self._before: list[torch.Tensor] = []
        self._settings: list[dict[str, float]] = []
        self._step = 0
        self._epoch_start = 0

    def attach(self, optimizer: torch.optim.Optimizer) -> SphericalMotionMonitor:
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.weights if id(p) not in groups]
        if missing:
            raise ValueError(f"the optimizer does not train {missing}")
        self._groups = [groups[id(p)] for _, p in self.weights]
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._before = [p.detach().clone() for _, p in self.weights]
        self._grad_sq = [p.grad.detach().double().square().sum() if p.grad is not None
                         else torch.zeros((), dtype=torch.float64, device=p.device)
                         for _, p in self.weights]
        self._settings = [{"lr": float(g["lr"]), "weight_decay": float(g.get("weight_decay", 0.0)),
                           "momentum": float(g.get("momentum", 0.0))} for g in self._groups]

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for (name, p), before, grad_sq, settings in zip(self.weights, self._before, self._grad_sq,
                                                        self._settings):
            norm_sq = before.double().square().sum()
            values = torch.stack([norm_sq, norm_sq * grad_sq]).tolist()  # one sync per weight
            norm = math.sqrt(values[0])
            self.steps.append({"step": self._step, "layer": name, "norm": norm,
                               "effective_lr": effective_lr(settings["lr"], norm),
                               "angle": angle(before, p), "unit_grad_sq": values[1], **settings})
        self._step += 1

    def epoch_end(self, run: Any, epoch: int, step_losses: list[float],
                  row: dict[str, Any] | None) -> None:
        """Summarize the steps since the last call as epoch ``epoch`` (``run`` unused)."""
        recent = [r for r in self.steps if r["step"] >= self._epoch_start]
        self._epoch_start = self._step
        for name, _ in self.weights:
            records = [r for r in recent if r["layer"] == name]
            if records:
                self.epochs.append(summarize(epoch, name, records))

    def take_windows(self, epoch: int, every: int, first_step: int = 0,
                     invariant: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        """Summaries (:func:`summarize`) of the steps recorded since the last call, in windows of
        ``every`` consecutive steps (the last may be shorter), per window then per weight; the
        steps are then forgotten. Each summary adds ``window`` (0, 1, ...), ``first_step`` (its
        first step counted from ``first_step``) and ``invariant`` (its name is in
        ``invariant``). What a training run keeps per epoch (``TrainConfig.spherical_every``)."""
        if every < 1:
            raise ValueError(f"expected windows of every >= 1 steps (got {every})")
        steps = sorted({r["step"] for r in self.steps})
        offset = {step: i for i, step in enumerate(steps)}  # step -> its index in this call
        out = []
        for window in range(math.ceil(len(steps) / every)):
            for name, _ in self.weights:
                records = [r for r in self.steps if r["layer"] == name
                           and offset[r["step"]] // every == window]
                out.append({**summarize(epoch, name, records), "window": window,
                            "first_step": first_step + window * every,
                            "invariant": name in invariant})
        self.steps = []
        self._epoch_start = self._step
        return out


def simulate_spherical_motion(lr: float, weight_decay: float, momentum: float, steps: int,
                              unit_grad_sq: float = 1.0, dim: int = 500, seed: int = 0,
                              every: int = 500) -> SphericalMotionMonitor:
    """SGD on a scale-invariant loss in the idealization behind the equilibrium predictions
    (Wan et al. 2021): each gradient a random direction orthogonal to ``w``, of norm
    ``sqrt(unit_grad_sq) / ||w||``, from a small random start in ``dim`` dimensions (float64).
    The monitor it returns closes an "epoch" every ``every`` steps: a known case for the
    predictions (``tests/probes/test_spherical.py``, the decay experiment's calibration)."""
    g = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(0.3 * torch.randn(dim, generator=g, dtype=torch.float64) / math.sqrt(dim))
    optimizer = torch.optim.SGD([weight], lr=lr, momentum=momentum, weight_decay=weight_decay)
    monitor = SphericalMotionMonitor([("w", weight)]).attach(optimizer)
    for step in range(steps):
        direction = torch.randn(dim, generator=g, dtype=torch.float64)
        w = weight.detach()
        direction -= (direction @ w) / (w @ w) * w  # orthogonal to w
        weight.grad = direction * math.sqrt(unit_grad_sq) / (direction.norm() * w.norm())
        optimizer.step()
        if (step + 1) % every == 0:
            monitor.epoch_end(None, (step + 1) // every, [], None)
    monitor.detach()
    return monitor


def summarize(epoch: int, layer: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One epoch of one weight's step records: means, the last ``norm``, and the equilibrium
    predictions of the last step's settings with the epoch's mean ``unit_grad_sq``."""
    last = records[-1]
    lr, weight_decay, momentum = last["lr"], last["weight_decay"], last["momentum"]
    mean_unit_grad_sq = statistics.fmean(r["unit_grad_sq"] for r in records)
    predicted_norm = equilibrium_weight_norm(lr, weight_decay, momentum, mean_unit_grad_sq)
    return {
        "epoch": epoch, "layer": layer, "steps": len(records),
        "norm": last["norm"], "mean_angle": statistics.fmean(r["angle"] for r in records),
        "mean_effective_lr": statistics.fmean(r["effective_lr"] for r in records),
        "mean_unit_grad_sq": mean_unit_grad_sq, "lr": lr, "weight_decay": weight_decay,
        "momentum": momentum,
        "predicted_angle": equilibrium_angular_update(lr, weight_decay, momentum),
        "predicted_norm": predicted_norm,
        "predicted_effective_lr": effective_lr(lr, predicted_norm) if predicted_norm > 0 else math.inf,
    }
