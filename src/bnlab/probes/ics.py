"""Internal covariate shift, measured two ways: the stability of layer inputs, and gradient ICS.

Why: the chapter says reducing internal covariate shift "seems not to be a valid
explanation" of BN's success. Two measurements make the claim testable:

* **Stability of layer inputs** (Ioffe & Szegedy 2015, Fig. 1; Santurkar et al. 2018,
  Fig. 2): ICS is the change of each unit's input distribution from one training step to
  the next. For every normalized layer (the input of every activation: BN's output, with
  noisy BN's distortion, or the pre-activation of a net without BN), on a fixed batch in
  training mode (batch statistics, and noisy BN's noise, which is part of what the next
  layer sees), :func:`layer_moments` takes each unit's mean and standard deviation (a conv
  channel over (N, H, W)), and the standard deviation of the same unit without the noise
  (the *spread* a shift is compared with). :func:`stability` condenses probes at steps
  ``t`` and ``t + 1`` into how far the mean and the standard deviation move in one step
  and over training (the range over the probes), in absolute units and relative to the
  spread, each the median over units. The moments of the distribution are measured
  directly, so noise added to every sample (which widens the distribution) cannot hide a
  shift of its mean: a measure in units of the noisy distribution's own width could not
  see it (issue 25).
* **Gradient ICS** (Santurkar et al. 2018, Definition 2.1): for weight layer i,
  ``G = dL/dW_i`` on a batch, and ``G'`` the same gradient after every layer *before* i took
  its SGD step ``W_j - lr * dL/dW_j`` on that batch, layers i and after unchanged.
  ``||G - G'||``, ``||G - G'|| / ||G||`` and ``cos(G, G')`` say how much the updates of the
  previous layers change what layer i is asked to do.

Ioffe & Szegedy's picture, the 15th, 50th and 85th percentiles of the last hidden layer's
sigmoid input over training, is kept (:func:`percentile_record`). All are measurements:
parameters, their ``.grad``, BN buffers (running statistics) and torch's RNG state are
exactly as before afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.nn import unfused, without_noise
from bnlab.probes.gradients import ACTIVATION_LAYERS, WEIGHT_LAYERS
from bnlab.util.scoped import in_mode, preserved_buffers, removing, restored_values

PERCENTILES = (0.15, 0.50, 0.85)


@contextmanager
def same_noise(device: torch.device) -> Iterator[Callable[[], None]]:
    """Fork torch's RNG; the yielded ``rewind()`` resets it to the fork's start, so two
    forwards of a noisy-BN net draw the same noise. The caller's RNG is untouched after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(device) if devices else None

        def rewind() -> None:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, device)

        yield rewind


def activation_inputs(model: nn.Module, x: torch.Tensor, train: bool = False,
                      seed: int = 0) -> list[torch.Tensor]:
    """The input of every activation layer the forward of ``model`` runs, in forward order,
    each as the activation received it (``(N, C)`` or ``(N, C, H, W)``).

    In eval mode by default (running statistics; noisy BN's expectation); ``train=True``
    uses batch statistics and, for noisy BN, noise drawn from an RNG seeded with ``seed``
    (the caller's RNG is untouched). The model's mode and buffers are restored. A fused
    batch norm's activation (``bnlab.nn.BatchNormAct``) is its ``act`` module, run as its own
    step here (``bnlab.nn.unfused``), so its input is seen.
    """
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inputs, out: captured.append(inputs[0]))
             for m in model.modules() if isinstance(m, ACTIVATION_LAYERS)]
    with removing(hooks), in_mode(model, train), torch.no_grad(), preserved_buffers(model), \
            same_noise(x.device), unfused(model):
        torch.manual_seed(seed)
        model(x)
    if not captured:
        raise ValueError(f"expected a model with an activation layer (got {type(model).__name__})")
    return captured


def last_activation_input(model: nn.Module, x: torch.Tensor, train: bool = False,
                          seed: int = 0) -> torch.Tensor:
    """The input of the last activation layer (:func:`activation_inputs`), ``(N, units)``
    (a conv map flattened per sample: every position a unit, as Ioffe & Szegedy's sigmoid)."""
    return activation_inputs(model, x, train, seed)[-1].flatten(1)


def unit_percentiles(values: torch.Tensor, q: tuple[float, ...] = PERCENTILES) -> torch.Tensor:
    """Percentiles over the batch of every unit: ``(N, units) -> (len(q), units)``."""
    return torch.quantile(values.double(), torch.tensor(q, dtype=torch.float64,
                                                        device=values.device), dim=0)


def percentile_record(model: nn.Module, x: torch.Tensor, unit: int = 0, train: bool = False,
                      seed: int = 0) -> dict[str, list[float]]:
    """``{"unit": [p15, p50, p85] of unit ``unit``, "median": per percentile, the median over
    the layer's units}`` of the last sigmoid's input (:func:`last_activation_input`)."""
    p = unit_percentiles(last_activation_input(model, x, train, seed))  # (3, units)
    return {"unit": p[:, unit].tolist(), "median": p.median(dim=1).values.tolist()}


# --------------------------------------------------------------------------- stability

def unit_moments(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of every unit over the batch, in float64:
    ``(N, C)`` or ``(N, C, H, W)`` -> ``(C,), (C,)`` (a conv channel over (N, H, W), as BN
    normalizes it)."""
    per_unit = values.detach().double().transpose(0, 1).flatten(1)  # (C, N * H * W)
    return per_unit.mean(dim=1), per_unit.std(dim=1)


def layer_moments(model: nn.Module, x: torch.Tensor, seed: int = 0
                  ) -> list[dict[str, torch.Tensor]]:
    """Per normalized layer (the input of every activation, :func:`activation_inputs`), in
    forward order: ``{"mean", "std"}`` of each unit on ``x`` in training mode, noisy BN's
    noise drawn with ``seed``, and ``"spread"``: the unit's standard deviation without the
    noise (``bnlab.nn.noisy.without_noise``; the same as ``"std"`` for a net without noise).
    Each a ``(C,)`` float64 tensor. The model is left as it was."""
    noisy = activation_inputs(model, x, train=True, seed=seed)
    with without_noise(model):
        clean = activation_inputs(model, x, train=True, seed=seed)
    layers = []
    for values, reference in zip(noisy, clean, strict=True):
        mean, std = unit_moments(values)
        layers.append({"mean": mean, "std": std, "spread": unit_moments(reference)[1]})
    return layers


def step_shift(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per unit, the mean over probes of ``|after - before|``: ``(T, C), (T, C) -> (C,)``
    (``after`` one training step after ``before``)."""
    return (after - before).abs().mean(dim=0)


def run_shift(values: torch.Tensor) -> torch.Tensor:
    """Per unit, the range over the probes (max - min): ``(T, C) -> (C,)``."""
    return values.max(dim=0).values - values.min(dim=0).values


def median_over_units(values: torch.Tensor) -> float:
    """The median over units of the finite values (nan when none is)."""
    finite = values[torch.isfinite(values)]
    return finite.quantile(0.5).item() if finite.numel() else math.nan


def stability(mean: torch.Tensor, std: torch.Tensor, next_mean: torch.Tensor,
              next_std: torch.Tensor, spread: torch.Tensor) -> dict[str, float]:
    """How far each unit's input distribution moves, the median over units.

    ``mean``, ``std``: each unit's moments at T probe steps ``(T, C)``; ``next_mean``,
    ``next_std``: the same one training step later ``(T, C)``; ``spread``: the unit's
    noise-free standard deviation at the probes ``(T, C)``, averaged over them to one
    reference per unit. Returns ``step_mean``, ``step_std`` (mean over probes of the change
    in one step), ``run_mean``, ``run_std`` (range over the probes: over training), each
    also ``*_rel``: divided by the unit's spread first (units of spread 0 left out).
    """
    reference = spread.mean(dim=0)  # (C,)
    reference = torch.where(reference > 0, reference, torch.full_like(reference, math.nan))
    shifts = {"step_mean": step_shift(mean, next_mean), "step_std": step_shift(std, next_std),
              "run_mean": run_shift(mean), "run_std": run_shift(std)}  # each (C,)
    out = {}
    for name, shift in shifts.items():
        out[name] = median_over_units(shift)
        out[f"{name}_rel"] = median_over_units(shift / reference)
    return out


def weight_layers_in_order(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """Every module of ``model`` that has parameters, in the order its forward first calls it
    (one no-grad forward in eval mode; the mode and buffers are restored)."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod) if mod not in order else None)
             for m in model.modules() if list(m.parameters(recurse=False))]
    with removing(hooks), in_mode(model, False), torch.no_grad(), preserved_buffers(model):
        model(x)
    return order


def gradient_ics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float,
                 loss_fn=F.cross_entropy) -> list[dict[str, float]]:
    """Santurkar et al.'s Definition 2.1 for every weight (conv/linear) layer, in forward order.

    Per layer i: ``{"layer", "norm": ||G||, "diff": ||G - G'||, "relative": ||G - G'||/||G||,
    "cosine": cos(G, G')}``. The gradients are of ``loss_fn(model(x), y)`` in train mode (BN
    with batch statistics); "the layers before i" are all parameters of the modules the
    forward runs before layer i (their biases and BN affines included), stepped by plain SGD
    ``p - lr * dL/dp``. Every forward draws the same noise (noisy BN), so G' differs from G
    only through the previous layers' update. Parameters, ``.grad``, buffers, the mode and
    the RNG are restored.
    """
    modules = weight_layers_in_order(model, x)
    params = [list(m.parameters(recurse=False)) for m in modules]
    flat = [p for group in params for p in group]
    results = []
    with restored_values(flat) as saved, in_mode(model, True), preserved_buffers(model), \
            same_noise(x.device) as rewind, torch.enable_grad():
        rewind()
        grads = torch.autograd.grad(loss_fn(model(x), y), flat, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(flat, grads)]
        start = 0
        for index, (module, group) in enumerate(zip(modules, params)):
            if isinstance(module, WEIGHT_LAYERS):
                with torch.no_grad():
                    for p, g in zip(flat[:start], grads[:start]):
                        p.sub_(lr * g)
                rewind()
                (g_after,) = torch.autograd.grad(loss_fn(model(x), y), [module.weight])
                with torch.no_grad():
                    for p, value in zip(flat[:start], saved[:start]):
                        p.copy_(value)
                g_before = grads[start + [id(p) for p in group].index(id(module.weight))]
                results.append(compare_gradients(f"{index}:{type(module).__name__}",
                                                 g_before, g_after))
            start += len(group)
    return results


def compare_gradients(layer: str, g: torch.Tensor, g_prime: torch.Tensor) -> dict[str, float]:
    """``||G - G'||``, relative to ``||G||``, and the cosine of G and G' (0 for a zero G)."""
    g, g_prime = g.double().flatten(), g_prime.double().flatten()
    norm, diff = g.norm().item(), (g - g_prime).norm().item()
    denom = norm * g_prime.norm().item()
    return {"layer": layer, "norm": norm, "diff": diff,
            "relative": diff / norm if norm > 0 else math.nan,
            "cosine": (g @ g_prime).item() / denom if denom > 0 else math.nan}
