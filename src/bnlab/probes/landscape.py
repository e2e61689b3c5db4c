"""The loss landscape along the gradient: Santurkar et al.'s (2018, Sec. 3.1) smoothness probes.

Why: Santurkar et al. argue that BN works by making the loss landscape smoother, not by
reducing internal covariate shift. They measure it at points of a real training run: take
the gradient ``g`` of the loss on the current batch at the current weights ``W`` and walk
along the step direction, ``W - eta * g``, for a grid of step sizes ``eta``:

* **loss range**: ``max_eta L(W - eta g) - min_eta L(W - eta g)`` (eta = 0 included): how
  much the loss changes along the step (a small range is a landscape that is safe to step in);
* **gradient predictiveness**: ``||grad L(W - eta g) - g||_2`` per eta: how far the gradient
  after the step is from the one that chose it (small: the gradient predicts the landscape);
* **effective beta-smoothness**: ``max_eta ||grad L(W - eta g) - g||_2 / ||eta g||_2``, the
  largest gradient change per unit of distance moved, a local Lipschitz constant of the
  gradient along the step. For a quadratic ``L = w^T A w / 2`` it is ``||A g|| / ||g||``,
  the curvature along g when g is an eigenvector of A.

The same batch is used throughout, in train mode (BN with batch statistics, as in the
step being probed). It is a measurement: parameters, ``.grad``, buffers (BN running
statistics) and the model's mode are as before afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bnlab.util.scoped import in_mode, preserved_buffers, restored_values

LossFn = Callable[[nn.Module], torch.Tensor]  # model -> scalar loss on the probed batch


def probe(model: nn.Module, loss_fn: LossFn, etas: Sequence[float]) -> dict[str, object]:
    """Loss, gradient change and their ratio at ``W - eta * g`` for each ``eta`` of ``etas``.

    Returns ``{"loss0", "grad_norm", "etas", "loss": [L(W - eta g)], "grad_change":
    [||grad L(W - eta g) - g||], "loss_range", "max_grad_change", "beta"}`` (see the module
    docstring; ``beta`` is nan when g is 0).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    losses, changes, ratios = [], [], []
    with restored_values(params) as saved, in_mode(model, True), preserved_buffers(model), \
            torch.enable_grad():
        loss0 = loss_fn(model)
        g = [gi.detach() for gi in torch.autograd.grad(loss0, params)]
        g_norm = _norm(g)
        for eta in etas:
            with torch.no_grad():
                for p, w, gi in zip(params, saved, g):
                    p.copy_(w - eta * gi)
            loss = loss_fn(model)
            moved = torch.autograd.grad(loss, params)
            change = _norm([a - b for a, b in zip(moved, g)])
            losses.append(loss.item())
            changes.append(change)
            step = abs(eta) * g_norm
            ratios.append(change / step if step > 0 else math.nan)
    every_loss = [loss0.item(), *losses]
    finite = [r for r in ratios if math.isfinite(r)]
    return {"loss0": loss0.item(), "grad_norm": g_norm, "etas": list(etas), "loss": losses,
            "grad_change": changes, "loss_range": max(every_loss) - min(every_loss),
            "max_grad_change": max(changes, default=math.nan),
            "beta": max(finite) if finite else math.nan}


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    """The l2 norm of several tensors taken as one vector."""
    return math.sqrt(sum(t.double().pow(2).sum().item() for t in tensors))
