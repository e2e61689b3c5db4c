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
for the first run's update. ``tests/training/test_weight_decay.py`` checks it on BN-LeNet
in float64, both runs to float rounding.
"""

from __future__ import annotations

import math

import torch
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
