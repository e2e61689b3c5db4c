"""Internal covariate shift, measured two ways: percentile drift and gradient ICS.

Why: the chapter says reducing internal covariate shift "seems not to be a valid
explanation" of BN's success. Two measurements make the claim testable:

* **Distribution drift** (Ioffe & Szegedy 2015, Fig. 1b-c): the 15th, 50th and 85th
  percentiles, over a fixed batch of held-out images, of the *input* of each sigmoid of a
  layer (one fixed unit, and the median over the layer's units), followed over training.
  ``drift`` condenses a trajectory into two numbers: how far the median moved, in units
  of the distribution's mean width (p85 - p15), and how much the width changed.
* **Gradient ICS** (Santurkar et al. 2018, Definition 2.1): for weight layer i,
  ``G = dL/dW_i`` on a batch, and ``G'`` the same gradient after every layer *before* i took
  its SGD step ``W_j - lr * dL/dW_j`` on that batch, layers i and after unchanged.
  ``||G - G'||``, ``||G - G'|| / ||G||`` and ``cos(G, G')`` say how much the updates of the
  previous layers change what layer i is asked to do.

Both are measurements: parameters, their ``.grad``, BN buffers (running statistics) and
torch's RNG state are exactly as before afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.nn import unfused
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


def last_activation_input(model: nn.Module, x: torch.Tensor, train: bool = False,
                          seed: int = 0) -> torch.Tensor:
    """The input of the last activation layer the forward of ``model`` runs, ``(N, units)``.

    In eval mode by default (running statistics, no noise); ``train=True`` uses batch
    statistics and, for noisy BN, noise drawn from an RNG seeded with ``seed`` (the caller's
    RNG is untouched). The model's mode and buffers are restored. A fused batch norm's
    activation (``bnlab.nn.BatchNormAct``) is its ``act`` module, run as its own step here
    (``bnlab.nn.unfused``), so its input is seen.
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
    return captured[-1].flatten(1)  # (N, units) (conv maps flattened per sample)


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


def drift(trajectory: list[list[float]]) -> dict[str, float]:
    """Drift of a percentile trajectory ``[[p15, p50, p85] per logged step]``.

    ``location``: (max - min of p50 over the steps) / mean width, width = p85 - p15: how far
    the centre travelled, in widths (scale-free, so nets with differently scaled inputs
    compare). ``scale``: log(max width / min width): 0 when the width never changed.
    """
    widths = [p85 - p15 for p15, _, p85 in trajectory]
    medians = [p50 for _, p50, _ in trajectory]
    mean_width = sum(widths) / len(widths)
    if not mean_width > 0 or min(widths) <= 0:
        return {"location": math.inf, "scale": math.inf}
    return {"location": (max(medians) - min(medians)) / mean_width,
            "scale": math.log(max(widths) / min(widths))}


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
