"""Per-layer gradient norms and activation statistics: the mechanism behind "BN helps depth".

Why: a deep plain sigmoid network does not fail to train for a mysterious reason: the
gradient reaching its first layers is many orders of magnitude smaller than the one at its
head (each sigmoid multiplies the backward signal by at most 1/4). Measuring the weight
gradient of every layer, in depth order, shows that directly, and shows what a norm layer
changes. These are measurements, so they must not disturb what they measure: the model's
BN running statistics and its parameters' ``.grad`` are exactly as they were afterwards.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.nn import unfused
from bnlab.util.scoped import preserved_buffers, removing

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ACTIVATION_LAYERS = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def layer_gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         loss_fn: LossFn = F.cross_entropy) -> list[tuple[str, float]]:
    """``(layer name, ||dL/dW||_2)`` of every conv/linear layer, in the order the forward runs them.

    One forward and backward of ``loss_fn(model(x), y)`` in the model's current mode (train
    mode: BN normalizes with batch statistics, as in a training step). The gradient is
    taken with ``torch.autograd.grad``, so no parameter's ``.grad`` is written, and the
    buffers are restored, so BN running statistics are unchanged. A layer run twice is
    listed once, at its first call.
    """
    call_order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if id(module) not in seen:
                seen.add(id(module))
                call_order.append((name, module))
        return hook

    handles = [module.register_forward_hook(record(name))
               for name, module in model.named_modules() if isinstance(module, WEIGHT_LAYERS)]
    # The backward runs before the buffers are restored: torch's BN saves its running
    # statistics for the backward and refuses tensors changed in place since.
    with preserved_buffers(model), torch.enable_grad():
        with removing(handles):
            loss = loss_fn(model(x), y)
        if not call_order:
            raise ValueError(f"expected a model with conv or linear layers "
                             f"(got {type(model).__name__} with none run in its forward)")
        weights = [module.weight for _, module in call_order]
        gradients = torch.autograd.grad(loss, weights, allow_unused=True)
    return [(name, 0.0 if grad is None else grad.norm().item())
            for (name, _), grad in zip(call_order, gradients)]


@torch.no_grad()
def activation_stats(model: nn.Module, x: torch.Tensor) -> list[tuple[str, float, float]]:
    """``(name, mean, std)`` of the output of every activation layer, in forward order.

    In the model's current mode, without gradients; buffers are restored, so a train-mode
    call leaves BN running statistics unchanged. In the ``deep`` nets and the LeNets the
    activations end each block, so this is the statistics of each block's output: a
    sigmoid net whose std collapses towards 0 (or whose outputs saturate at 0/1) with depth
    is one whose gradients vanish. A fused batch norm's activation (``bnlab.nn.BatchNormAct``)
    is its ``act`` module, run as its own step here (``bnlab.nn.unfused``).
    """
    stats: list[tuple[str, float, float]] = []

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            stats.append((name, output.mean().item(), output.std().item()))
        return hook

    handles = [module.register_forward_hook(record(name))
               for name, module in model.named_modules() if isinstance(module, ACTIVATION_LAYERS)]
    with removing(handles), preserved_buffers(model), unfused(model):
        model(x)
    return stats


# --------------------------------------------------------------------------- growth with depth

def growth_per_layer(norms: Sequence[float]) -> float:
    """The geometric factor by which ``norms`` grow per layer towards the input, fitted.

    ``norms[l]`` is a per-layer gradient norm in depth order (index 0 = input side). The
    fit is the least-squares line ``ln norms[l] = a + b l`` over the positive finite values
    (zeros that underflowed and non-finite values are left out); the factor is ``exp(-b)``:
    above 1 the gradient grows towards the input (explodes backwards), below 1 it vanishes.
    A profile ``c r^(L-l)`` gives exactly ``r``. nan with fewer than two usable values.
    """
    points = [(index, math.log(value)) for index, value in enumerate(norms)
              if math.isfinite(value) and value > 0]
    if len(points) < 2:
        return math.nan
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return math.exp(-sxy / sxx)


def mean_field_growth(activation: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """``E[phi'(z)^2] / Var[phi(z)]`` for ``z ~ N(0, 1)``: the factor by which the *squared*
    gradient norm grows per BN layer, towards the input, in a plain ``linear -> BN -> phi``
    network at initialization, in the mean-field limit (infinite width, infinite batch).

    Why: in that limit every BN input is, per neuron, a standard Gaussian over the batch.
    Backwards through one block, ``linear`` multiplies the squared gradient by
    ``sigma_w^2`` (times the fan-in), ``phi`` by ``E[phi'(z)^2]``, and BN divides by the
    batch variance of the next pre-activation, ``sigma_w^2 Var[phi(z)]`` (times the same
    fan-in); the weight scale cancels, so no initialization can tune the factor away.
    BN's projection of the batch mean and of the normalized direction removes 2 of B
    directions, nothing as B grows. For ReLU this is ``(1/2) / (1/2 - 1/(2 pi)) =
    pi / (pi - 1)``, Yang et al.'s (2019) large-batch rate. The expectations are
    midpoint sums over 240000 cells of [-12, 12] in float64; 0 is a cell boundary, so a
    kink or jump there (ReLU's) costs no accuracy.
    """
    cells = 240000
    width = 24.0 / cells
    z = (-12.0 + width * (torch.arange(cells, dtype=torch.float64) + 0.5)).requires_grad_(True)
    weight = torch.exp(-z.detach() ** 2 / 2) * (width / math.sqrt(2 * math.pi))
    phi = activation(z)
    (slope,) = torch.autograd.grad(phi.sum(), z)
    phi = phi.detach()

    def expect(values: torch.Tensor) -> float:
        return (values * weight).sum().item()

    mean = expect(phi)
    return expect(slope ** 2) / (expect(phi ** 2) - mean ** 2)
