"""Weight decay with batch norm: which parameters are decayed, and Li & Arora's equivalent
exponential learning-rate schedule.

Why: for a scale-invariant weight (one that feeds a batch norm:
``bnlab.probes.spherical.scale_invariant_weights``) weight decay is not a regularizer but
a learning-rate schedule in disguise, and whether to decay batch norm's gamma/beta at all
is a choice with its own folklore (Summers & Dinneen 2020, "Four things everyone should
know to improve batch normalization"). So the trainer can leave either out
(``TrainConfig.norm_weight_decay``, ``TrainConfig.invariant_weight_decay``) through
:func:`decay_groups`, and the equivalence itself is spelled out here.

Li & Arora (ICLR 2020, "An exponential learning rate schedule for deep learning",
arXiv:1910.07454), main theorem, written here in torch's SGD form and derived again
below: on a loss for which every trained parameter is
scale-invariant, SGD with learning rate eta, weight decay lambda and momentum mu (torch's
SGD: ``v_{t+1} = mu v_t + g_t + lambda w_t``, ``w_{t+1} = w_t - eta v_{t+1}``, ``v_0 = 0``)
and SGD with the same momentum, NO weight decay and the learning rate

    eta_t = eta * alpha^(-2t - 1)        (t = 0, 1, ...: the step)

where alpha is the larger root of ``x^2 - (1 + mu - eta lambda) x + mu = 0`` (without
momentum alpha = 1 - eta lambda, their warm-up theorem), started from the same weights,
give the same network at every step: ``w~_t = alpha^(-t) w_t``. With momentum the second
run starts one step "earlier" at ``w~_{-1} = alpha w_{-1}`` (the first run's ``w_{-1} =
w_0``, as ``v_0 = 0``), which in torch's form is the momentum buffer
``v~_0 = (alpha - 1) / (eta alpha) * w_0`` (:func:`prime_momentum`). The proof is three
lines given scale invariance, ``grad L(c w) = grad L(w) / c``: substitute
``w~_t = alpha^(-t) w_t`` into the second run and the quadratic appears as the condition
for the first run's update. :func:`li_arora_gap` runs both on a model's scale-invariant weights;
``tests/training/test_weight_decay.py`` checks it on BN-LeNet in float64, both runs to float
rounding, and ``bnlab exp decay`` reports it as a calibration.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.nn import is_batch_norm
from bnlab.probes.spherical import scale_invariant_weights

NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
"""Normalization layers other than batch norms (``bnlab.nn.is_batch_norm``) whose affine
weight and bias count as "the norm layers' gamma/beta"."""


def norm_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """gamma and beta of every normalization layer (batch norms, frozen ones' excepted as
    they have none, and group, layer and instance norms)."""
    return [p for m in model.modules() if is_batch_norm(m) or isinstance(m, NORM_LAYERS)
            for p in m.parameters(recurse=False)]


def decay_groups(model: nn.Module, weight_decay: float, norm_decay: bool = True,
                 invariant_decay: bool = True) -> list[dict]:
    """Parameter groups of ``model`` for ``torch.optim.SGD``: every parameter decayed by
    ``weight_decay``, except the norm layers' gamma/beta when ``norm_decay`` is off and the
    scale-invariant weights when ``invariant_decay`` is off (weight decay 0 there). With
    both on, one group of all parameters (what ``SGD(model.parameters())`` makes)."""
    if norm_decay and invariant_decay:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    norm = {id(p) for p in norm_affine_parameters(model)}
    invariant = {id(p) for _, p in scale_invariant_weights(model)}
    groups = {"decayed": [], "norm-affine": [], "scale-invariant": []}
    for p in model.parameters():
        kind = "norm-affine" if id(p) in norm else "scale-invariant" if id(p) in invariant else "decayed"
        groups[kind].append(p)
    decay = {"decayed": weight_decay, "norm-affine": weight_decay if norm_decay else 0.0,
             "scale-invariant": weight_decay if invariant_decay else 0.0}
    return [{"params": params, "weight_decay": decay[kind], "name": kind}
            for kind, params in groups.items() if params]


def li_arora_growth(lr: float, weight_decay: float, momentum: float = 0.0) -> float:
    """alpha: the larger root of ``x^2 - (1 + mu - eta lambda) x + mu = 0`` (module
    docstring); ``1 - eta lambda`` without momentum. ValueError when there is no real root
    (``eta lambda`` too large for the momentum)."""
    b = 1 + momentum - lr * weight_decay
    discriminant = b * b - 4 * momentum
    if discriminant < 0 or b <= 0:
        raise ValueError(f"x^2 - (1 + mu - eta lambda) x + mu has no positive real root for "
                         f"eta={lr}, lambda={weight_decay}, mu={momentum}")
    return (b + math.sqrt(discriminant)) / 2


def li_arora_lr(lr: float, weight_decay: float, momentum: float, step: int) -> float:
    """``eta * alpha^(-2 step - 1)``: the learning rate of step ``step`` (0-based) of the run
    without weight decay that equals SGD with ``(lr, weight_decay, momentum)``."""
    return lr * li_arora_growth(lr, weight_decay, momentum) ** (-2 * step - 1)


def li_arora_scheduler(optimizer: torch.optim.Optimizer,
                       weight_decay: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule (call ``.step()`` after every ``optimizer.step()``) that sets each
    group's learning rate to :func:`li_arora_lr` of its initial one and its momentum.
    ``optimizer`` must itself have no weight decay: the schedule replaces it."""
    if any(group.get("weight_decay", 0.0) for group in optimizer.param_groups):
        raise ValueError("the Li-Arora schedule replaces weight decay: give the optimizer none")
    alphas = [li_arora_growth(group["lr"], weight_decay, group.get("momentum", 0.0))
              for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda step, alpha=alpha: alpha ** (-2 * step - 1) for alpha in alphas])


@torch.no_grad()
def prime_momentum(optimizer: torch.optim.SGD, weight_decay: float) -> None:
    """Set each parameter's momentum buffer to ``(alpha - 1) / (eta alpha) * w_0``, the
    initial condition of Li & Arora's equivalence with momentum (module docstring), eta
    being the group's base learning rate (``initial_lr`` once a scheduler is attached);
    call before the first step. Groups without momentum are left alone."""
    for group in optimizer.param_groups:
        momentum = group.get("momentum", 0.0)
        if not momentum:
            continue
        lr = group.get("initial_lr", group["lr"])
        alpha = li_arora_growth(lr, weight_decay, momentum)
        for p in group["params"]:
            optimizer.state[p]["momentum_buffer"] = (alpha - 1) / (lr * alpha) * p.detach().clone()


# --------------------------------------------------------------------------- the equivalence, run

EXACT_EPS = 1e-30
"""BN's eps is the one thing that breaks scale invariance (``BN_eps(c h) = BN_{eps/c^2}(h)``);
1e-30 vanishes next to any variance in float64."""


def exactly_scale_invariant(model: nn.Module) -> nn.Module:
    """``model`` (in place) in float64 with every batch norm's eps at :data:`EXACT_EPS`, so that
    its scale-invariant weights are invariant to float rounding, as the theorem assumes."""
    model.double()
    for module in model.modules():
        if is_batch_norm(module) and hasattr(module, "eps"):
            module.eps = EXACT_EPS
    return model


@dataclass(frozen=True)
class EquivalenceGap:
    """How far apart the two runs of :func:`li_arora_gap` end."""

    loss: float  # largest |loss - loss~| / |loss| over the steps
    direction: float  # largest |w / ||w|| - w~ / ||w~||| over every entry of every trained weight
    norm_ratio: float  # ||w~|| / ||w|| of the first trained weight after the last step
    steps: int


def li_arora_gap(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 lr: float, weight_decay: float, momentum: float = 0.0, schedule: bool = True,
                 prime: bool = True) -> EquivalenceGap:
    """Train two copies of ``model`` (train mode) on ``batches``, each updating only its
    scale-invariant weights (everything else frozen, as the theorem assumes): one by SGD with
    ``lr``, ``weight_decay`` and ``momentum``; the other by SGD without weight decay under
    :func:`li_arora_scheduler` with :func:`prime_momentum` (``schedule=False``: at the constant
    ``lr`` instead, the contrast; ``prime=False``: the momentum buffer left at 0). With the
    schedule the two give the same losses and normalized weights up to float rounding, and
    ``norm_ratio`` is ``alpha^(-steps)``; ``model`` is not changed."""
    runs = []
    for scheduled in (False, True):
        copy_ = copy.deepcopy(model).train()
        weights = [p for _, p in scale_invariant_weights(copy_)]
        if not weights:
            raise ValueError("the model has no scale-invariant weights to train")
        copy_.requires_grad_(False)
        for p in weights:
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(weights, lr=lr, momentum=momentum,
                                    weight_decay=0.0 if scheduled else weight_decay)
        scheduler = li_arora_scheduler(optimizer, weight_decay) if scheduled and schedule else None
        if scheduled and schedule and prime:
            prime_momentum(optimizer, weight_decay)
        losses = []
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(copy_(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if scheduler is not None:
                scheduler.step()
        runs.append((losses, [w.detach() for w in weights]))
    (losses, weights), (scheduled_losses, scheduled_weights) = runs
    return EquivalenceGap(
        loss=max(abs(a - b) / abs(a) for a, b in zip(losses, scheduled_losses)),
        direction=max((a / a.norm() - b / b.norm()).abs().max().item()
                      for a, b in zip(weights, scheduled_weights)),
        norm_ratio=(scheduled_weights[0].norm() / weights[0].norm()).item(), steps=len(losses))
