"""Accuracy under input perturbations: Gaussian noise, FGSM and PGD (L-infinity).

Why: "does BN make a model more or less robust?" is a claim about a trained model at
prediction time, so every number here comes from the model in EVAL mode (BN uses its
running statistics) while autograd is ON for the input, to get dL/dx for the attacks.
That combination is exactly where a BN that picks its statistics by grad mode (the
chapter's scratch ``batch_norm`` checks ``torch.is_grad_enabled()``) goes wrong: it would
normalize each adversarial batch with its own batch statistics, and update the running
statistics while being attacked. bnlab's BN follows ``module.training``, as torch's does,
so an attack sees the same function that ``evaluate`` measures.

Conventions: inputs are images in [0, 1] and every perturbed input is clamped back to
[0, 1]; perturbation sizes are in those units (8/255 is about 0.031). The loss that is
attacked is the summed cross-entropy of the batch (its sign per input is what FGSM/PGD
use, so sum or mean gives the same attack). Each function returns
``[(size, accuracy), ...]`` in the order of the sizes given, restores the model's
train/eval mode, and writes neither BN buffers nor parameter ``.grad`` (gradients are
taken with ``torch.autograd.grad`` with respect to the input only).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.nn.precise import batch_norm_layers, update_bn_stats
from bnlab.util.scoped import in_mode

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Perturb = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PGD_STEP_FACTOR = 2.5
"""Default PGD step size is ``PGD_STEP_FACTOR * epsilon / steps`` (Madry et al.'s choice):
enough total movement to cross the epsilon-ball from a random start and still refine."""


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dL/dx of the summed cross-entropy at ``x``, shape of ``x``; in the model's current mode.

    Works under an outer ``torch.no_grad()`` too; no parameter ``.grad`` is written.
    """
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, x)
    return gradient


def noise_accuracy(model: nn.Module, batches: Batches, sigmas: Sequence[float], seed: int = 0,
                   max_batches: int | None = None) -> list[tuple[float, float]]:
    """Accuracy on ``clamp(x + sigma * z, 0, 1)`` with ``z ~ N(0, 1)``, for each sigma.

    Deterministic per ``seed`` (and device): every sigma uses the same draws of ``z`` (a
    generator seeded with ``seed`` restarted per sigma), so the curve compares noise
    levels, not noise samples. ``batches`` must yield the same batches each time.
    """
    return [(sigma, perturbed_accuracy(model, batches, gaussian_noise(sigma, seed), max_batches))
            for sigma in sigmas]


def fgsm_accuracy(model: nn.Module, batches: Batches, epsilons: Sequence[float],
                  max_batches: int | None = None) -> list[tuple[float, float]]:
    """Accuracy on FGSM inputs ``clamp(x + epsilon * sign(dL/dx), 0, 1)``, for each epsilon."""
    return [(epsilon, perturbed_accuracy(model, batches, fgsm(model, epsilon), max_batches))
            for epsilon in epsilons]


def pgd_accuracy(model: nn.Module, batches: Batches, epsilons: Sequence[float], steps: int = 10,
                 step_size: float | None = None, seed: int = 0,
                 max_batches: int | None = None) -> list[tuple[float, float]]:
    """Accuracy on L-infinity PGD inputs (see :func:`pgd`), for each epsilon.

    ``step_size`` defaults to ``PGD_STEP_FACTOR * epsilon / steps``; the random start is
    deterministic per ``seed`` (and device).
    """
    return [(epsilon, perturbed_accuracy(model, batches, pgd(model, epsilon, steps, step_size, seed),
                                         max_batches))
            for epsilon in epsilons]


def gaussian_noise(sigma: float, seed: int) -> Perturb:
    """``(x, y) -> clamp(x + sigma * z, 0, 1)``, ``z ~ N(0, 1)`` from a generator seeded once."""
    _check_size("sigma", sigma)
    generator = _Generator(seed)

    def perturb(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = torch.randn(x.shape, generator=generator.on(x.device), device=x.device, dtype=x.dtype)
        return (x + sigma * z).clamp(0.0, 1.0)

    return perturb


def fgsm(model: nn.Module, epsilon: float) -> Perturb:
    """``(x, y) -> clamp(x + epsilon * sign(dL/dx), 0, 1)`` (one signed-gradient step)."""
    _check_size("epsilon", epsilon)

    def perturb(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x + epsilon * input_gradient(model, x, y).sign()).clamp(0.0, 1.0)

    return perturb


def pgd(model: nn.Module, epsilon: float, steps: int = 10, step_size: float | None = None,
        seed: int = 0) -> Perturb:
    """L-infinity PGD with a random start: ``x_0 = clamp(x + u, 0, 1)``, ``u ~ U(-eps, eps)``, then
    ``steps`` times::

        x_{t+1} = clamp(clip(x_t + step_size * sign(dL/dx_t), x - eps, x + eps), 0, 1)

    The last iterate is returned.
    """
    _check_size("epsilon", epsilon)
    if steps < 1:
        raise ValueError(f"expected steps >= 1 (got {steps})")
    if step_size is not None and step_size < 0:
        raise ValueError(f"expected step_size >= 0 (got {step_size})")
    alpha = PGD_STEP_FACTOR * epsilon / steps if step_size is None else step_size
    generator = _Generator(seed)

    def perturb(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        u = torch.rand(x.shape, generator=generator.on(x.device), device=x.device, dtype=x.dtype)
        x_adv = (x + epsilon * (2 * u - 1)).clamp(0.0, 1.0)  # uniform start in the eps-ball
        for _ in range(steps):
            x_adv = x_adv + alpha * input_gradient(model, x_adv, y).sign()
            x_adv = torch.minimum(torch.maximum(x_adv, x - epsilon), x + epsilon).clamp(0.0, 1.0)
        return x_adv

    return perturb


def perturbed_accuracy(model: nn.Module, batches: Batches, perturb: Perturb,
                       max_batches: int | None = None) -> float:
    """Accuracy of ``model`` in eval mode on ``perturb(x, y)`` over (the first ``max_batches``
    of) ``batches``; the model's mode is restored."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"expected max_batches >= 1 or None (got {max_batches})")
    correct = count = 0
    with in_mode(model, False):
        for x, y in itertools.islice(batches, max_batches):
            x_perturbed = perturb(x, y).detach()  # (B, 1, 28, 28)
            with torch.no_grad():
                correct += (model(x_perturbed).argmax(dim=1) == y).sum().item()
            count += y.numel()
    if count == 0:
        raise ValueError("expected at least one batch (got an empty iterable)")
    return correct / count


class _Generator:
    """A seeded ``torch.Generator`` created on the device of the first batch it serves."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generator: torch.Generator | None = None

    def on(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator


def _check_size(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"expected {name} >= 0 (got {value})")


STATISTICS = ("running", "precise", "batch", "adapted")
"""Where a BN model's normalization statistics come from when it is evaluated on noisy images:
its running averages from training (eval mode); population statistics of clean training
images, re-estimated for the final weights (``bnlab.nn.precise.update_bn_stats``); each noisy
batch's own statistics (the BN layers in train mode, nothing else); or statistics
re-estimated on all the noisy images ("adaptive BN", Li et al. 2016: ``update_bn_stats`` on
the shifted domain). ``running`` vs ``precise`` is the averages' lag; ``precise`` vs
``adapted`` is the shift of the statistics that the noise causes."""


def noise_accuracy_by_statistics(model: nn.Module, batches: Batches, sigmas: Sequence[float],
                                 clean: Batches, seed: int = 0, max_batches: int | None = None
                                 ) -> list[tuple[float, dict[str, float]]]:
    """For each sigma, accuracy on ``clamp(x + sigma * z, 0, 1)`` (the draws of
    :func:`noise_accuracy`) with each of :data:`STATISTICS`; ``precise`` is re-estimated on
    every batch of ``clean`` (clean training images). Every evaluation runs on a copy: the
    model, its mode and its buffers are untouched. A model without batch norms has one
    function, so all four are its eval-mode accuracy."""

    def reestimated(on: list) -> nn.Module:
        return update_bn_stats(copy.deepcopy(model), on, num_batches=len(on), progress=False)

    has_bn = bool(batch_norm_layers(model))
    precise = reestimated(list(clean)) if has_bn else model
    out = []
    for sigma in sigmas:
        perturb = gaussian_noise(sigma, seed)
        noisy = [(perturb(x, y).detach(), y) for x, y in itertools.islice(batches, max_batches)]
        if not noisy:
            raise ValueError("expected at least one batch (got an empty iterable)")
        running = _accuracy(model, noisy, batch_statistics=False)
        if not has_bn:
            out.append((sigma, dict.fromkeys(STATISTICS, running)))
            continue
        out.append((sigma, {"running": running,
                            "precise": _accuracy(precise, noisy, batch_statistics=False),
                            "batch": _accuracy(model, noisy, batch_statistics=True),
                            "adapted": _accuracy(reestimated(noisy), noisy,
                                                 batch_statistics=False)}))
    return out


@torch.no_grad()
def _accuracy(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
              batch_statistics: bool) -> float:
    """Accuracy of a copy of ``model`` in eval mode, its batch norms in train mode (each
    batch normalized by its own statistics) when ``batch_statistics``."""
    probe = copy.deepcopy(model).eval()
    if batch_statistics:
        for _, layer in batch_norm_layers(probe):
            layer.train()
    correct = count = 0
    for x, y in batches:
        correct += (probe(x).argmax(dim=1) == y).sum().item()
        count += y.numel()
    return correct / count
