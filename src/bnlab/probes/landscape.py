"""The loss landscape along the gradient: Santurkar et al.'s (2018, Sec. 3.1) smoothness probes.

Why: Santurkar et al. argue that BN works by making the loss landscape smoother, not by
reducing internal covariate shift. They measure it at points of a real training run: take
the gradient ``g`` of the loss on the current batch at the current weights ``W`` and walk
along the step direction. :func:`probe` walks two paths from the same ``W``:

* ``gradient``: ``W - eta * g`` for a grid of step sizes ``eta``, as the paper does (the
  distance moved is ``eta * ||g||``, so a net with small gradients moves less);
* ``normalized``: ``W - d * g / ||g||`` for a grid of distances ``d``, the same distances for
  every net whatever its gradient's size (not taken where ``g = 0``).

Along a path, :func:`smoothness` reads Santurkar et al.'s three measures, each absolute (as
theirs) and relative:

* **loss range**: ``max L - min L`` over the path (the start included): how much the loss
  changes along the step; relative: over the loss at the start, ``L(W)``;
* **gradient predictiveness**: ``max ||grad L(W') - g||_2`` over the path: how far the
  gradient after the step is from the one that chose it (small: the gradient predicts the
  landscape); relative: over ``||g||``;
* **effective beta-smoothness**: ``max ||grad L(W') - g||_2 / ||W' - W||_2``, the largest
  gradient change per unit of distance moved: a local Lipschitz constant of the gradient
  along the step. For a quadratic with Hessian ``A`` it is ``||A g|| / ||g||``, the
  eigenvalue of ``A`` when ``g`` is an eigenvector.

Why relative measures and normalized steps: a net on a plateau has small gradients, so its
``eta * g`` steps are short and every absolute measure reads small: it looks smooth without
being so. Scaling a loss by ``s`` scales the absolute measures of the normalized path by
``s`` and leaves the relative ones unchanged (:class:`QuadraticLoss` gives the closed forms).

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
PATHS = ("gradient", "normalized")
"""The two paths of :func:`probe`: ``W - eta g`` and ``W - d g / ||g||``."""
MEASURES = ("loss_range", "relative_loss_range", "grad_change", "relative_grad_change", "beta")
"""What :func:`smoothness` reads along a path."""


def probe(model: nn.Module, loss_fn: LossFn, etas: Sequence[float] = (),
          distances: Sequence[float] = ()) -> dict[str, object]:
    """The loss and the gradient change along ``W - eta g`` for each of ``etas`` and along
    ``W - d g / ||g||`` for each of ``distances``, from the model's current weights ``W``.

    Returns ``{"loss0": L(W), "grad_norm": ||g||, "gradient": path, "normalized": path}``,
    each path ``{"sizes": [eta or d], "moved": [||W' - W||], "loss": [L(W')],
    "grad_change": [||grad L(W') - g||]}``; the normalized path is empty where ``g = 0``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with restored_values(params) as saved, in_mode(model, True), preserved_buffers(model), \
            torch.enable_grad():
        loss0 = loss_fn(model)
        g = [gi.detach() for gi in torch.autograd.grad(loss0, params)]
        g_norm = _norm(g)

        def walk(sizes: Sequence[float], per_unit: float) -> dict[str, list[float]]:
            """Steps of ``size * per_unit * g`` for each size."""
            path: dict[str, list[float]] = {"sizes": [], "moved": [], "loss": [], "grad_change": []}
            for size in sizes:
                with torch.no_grad():
                    for p, w, gi in zip(params, saved, g):
                        p.copy_(w - size * per_unit * gi)
                loss = loss_fn(model)
                moved = torch.autograd.grad(loss, params)
                path["sizes"].append(float(size))
                path["moved"].append(abs(size) * per_unit * g_norm)
                path["loss"].append(loss.item())
                path["grad_change"].append(_norm([a - b for a, b in zip(moved, g)]))
            return path

        gradient = walk(etas, 1.0)
        normalized = walk(distances if g_norm > 0 else (), 1.0 / g_norm if g_norm > 0 else 0.0)
    return {"loss0": loss0.item(), "grad_norm": g_norm, "gradient": gradient,
            "normalized": normalized}


def smoothness(loss0: float, grad_norm: float, path: dict[str, list[float]]) -> dict[str, float]:
    """The measures of :data:`MEASURES` along one path of :func:`probe` (module docstring).

    A loss or gradient change that is not finite (the step left the region where the loss
    is defined) reads as an infinite range or change; an empty path reads nan throughout;
    a relative measure is nan where its denominator is 0.
    """
    if not path["sizes"]:
        return dict.fromkeys(MEASURES, math.nan)
    losses = [loss0, *path["loss"]]
    loss_range = max(losses) - min(losses) if all(map(math.isfinite, losses)) else math.inf
    changes = [c if math.isfinite(c) else math.inf for c in path["grad_change"]]
    change = max(changes)
    per_distance = [c / m for c, m in zip(changes, path["moved"]) if m > 0]
    return {"loss_range": loss_range,
            "relative_loss_range": _ratio(loss_range, abs(loss0)),
            "grad_change": change,
            "relative_grad_change": _ratio(change, grad_norm),
            "beta": max(per_distance) if per_distance else math.nan}


def _ratio(value: float, denominator: float) -> float:
    return value / denominator if denominator > 0 else math.nan


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    """The l2 norm of several tensors taken as one vector."""
    return math.sqrt(sum(t.double().pow(2).sum().item() for t in tensors))


class QuadraticLoss(nn.Module):
    """A synthetic landscape with known answers: ``L(w) = c + g0 . (w - w0) + 1/2 (w - w0)^T
    diag(h) (w - w0)`` for one parameter ``w`` (float64) that starts at ``w0``.

    At the start the gradient is ``g0`` and the curvature ``diag(h)``. With ``g0`` along the
    first axis (an eigenvector, eigenvalue ``h[0]``), at ``||g0|| = G``, :func:`smoothness`
    reads in closed form, along ``W - s u`` with ``u`` the unit step (``u = g0`` for the
    gradient path, where ``s = eta G`` is the distance moved; ``s = d`` for the normalized one):
    ``L = c - s G + s^2 h[0] / 2``, ``||delta g|| = s h[0]``, beta ``= h[0]``. ``h = 0`` is a
    linear loss (no gradient change, beta 0); ``g0 = h = 0`` a flat region (nothing moves).
    """

    def __init__(self, g0: Sequence[float], h: Sequence[float], c: float = 1.0) -> None:
        super().__init__()
        if len(g0) != len(h):
            raise ValueError(f"expected g0 and h of one length (got {len(g0)} and {len(h)})")
        self.register_buffer("g0", torch.tensor(g0, dtype=torch.float64))
        self.register_buffer("h", torch.tensor(h, dtype=torch.float64))
        self.register_buffer("w0", torch.zeros(len(g0), dtype=torch.float64))
        self.c = c
        self.w = nn.Parameter(self.w0.clone())

    def forward(self) -> torch.Tensor:
        delta = self.w - self.w0  # (n,)
        return self.c + self.g0 @ delta + 0.5 * (self.h * delta) @ delta
