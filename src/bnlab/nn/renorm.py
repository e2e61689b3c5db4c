"""Batch renormalization (Ioffe 2017): batch norm whose training output matches prediction.

Why: batch norm trains on batch statistics and predicts with running ones; with small or
non-i.i.d. batches the two differ and the model sees different activations at test time.
Batch renormalization corrects the batch-normalized value towards what the running
statistics would give, with a correction that is a constant for the gradient.

Formula, in training, per channel c (``mu_B``/``var_B`` the batch mean and biased
variance over every dim but dim 1, ``mu``/``var`` the running statistics *before* this
batch updates them)::

    sigma_B = sqrt(var_B + eps)          sigma = sqrt(var + eps)
    r = clip(sigma_B / sigma, 1 / r_max, r_max)
    d = clip((mu_B - mu) / sigma, -d_max, d_max)
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

``r`` and ``d`` are treated as constants in backward (stop-gradient), as in the paper;
with ``r = 1, d = 0`` this is batch norm. The running statistics then move as batch
norm's do (``running = (1 - momentum) * running + momentum * batch``, variance stored
unbiased), so a renorm layer's state is a batch norm's and loads into one; the paper
averages sigma instead of the variance, a difference of convention only.

Warm-up: while ``num_batches_tracked < warmup_steps`` (counting batches before this one)
the layer is plain batch norm. Default 100: with momentum 0.1 the running statistics
have then forgotten their (0, 1) initialisation (0.9^100, about 3e-5) and ``r``/``d``
compare against real population estimates. ``r_max`` and ``d_max`` are floats or
schedules, callables of the step (``num_batches_tracked`` before this batch) returning
the bound; :data:`PAPER_R_MAX` and :data:`PAPER_D_MAX` are the paper's ramp (BN, i.e.
``r_max = 1, d_max = 0``, for 5000 steps, then linearly to 3 over 40k steps and to 5
over 25k steps; use them with ``warmup_steps=0``). Bounds must satisfy ``r_max >= 1``,
``d_max >= 0``.

Prediction (``eval()``) is plain batch norm with the running statistics. The layer needs
running statistics (``track_running_stats=True``): they are what it renormalizes to.

The arithmetic is ``bnlab.functional.batch_norm`` with weight ``gamma * r`` and bias
``gamma * d + beta`` (r, d detached): exactly the formula above and its stop-gradient
backward, in the layer's ``impl``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bnlab.functional import DEFAULT_IMPL, Impl, check_input
from bnlab.functional import batch_norm as functional_batch_norm
from bnlab.nn.batchnorm import _BatchNorm

__all__ = ["PAPER_D_MAX", "PAPER_R_MAX", "BatchRenorm1d", "BatchRenorm2d", "Ramp"]

Bound = float | Callable[[int], float]

DEFAULT_WARMUP_STEPS = 100
"""Batches of plain batch norm before renormalization starts (see the module docstring)."""


@dataclass(frozen=True)
class Ramp:
    """A bound that is ``start`` until step ``begin``, then linear to ``end`` over ``steps``."""

    start: float
    end: float
    begin: int
    steps: int

    def __post_init__(self) -> None:
        if self.begin < 0 or self.steps < 1:
            raise ValueError(f"expected begin >= 0 and steps >= 1 (got {self.begin}, {self.steps})")

    def __call__(self, step: int) -> float:
        progress = min(max(step - self.begin, 0) / self.steps, 1.0)
        return self.start + (self.end - self.start) * progress


PAPER_R_MAX = Ramp(start=1.0, end=3.0, begin=5000, steps=40000)
"""Ioffe (2017)'s r_max: 1 for 5000 steps, then linearly up to 3 over 40k steps."""
PAPER_D_MAX = Ramp(start=0.0, end=5.0, begin=5000, steps=25000)
"""Ioffe (2017)'s d_max: 0 for 5000 steps, then linearly up to 5 over 25k steps."""


def _check_bounds(r_max: float, d_max: float, where: str) -> None:
    if not (isinstance(r_max, int | float) and math.isfinite(r_max) and r_max >= 1):
        raise ValueError(f"r_max must be a finite number >= 1 (r is clipped to "
                         f"[1/r_max, r_max]) (got {r_max!r}{where})")
    if not (isinstance(d_max, int | float) and math.isfinite(d_max) and d_max >= 0):
        raise ValueError(f"d_max must be a finite number >= 0 (d is clipped to "
                         f"[-d_max, d_max]) (got {d_max!r}{where})")


def _bound_at(bound: Bound, step: int) -> float:
    return bound(step) if callable(bound) else bound


class _BatchRenorm(_BatchNorm):
    """Shared body of BatchRenorm1d/2d; see the module docstring."""

    _extra_args = ("r_max", "d_max", "warmup_steps")  # beyond BN's arguments (frozen.py)

    def __init__(self, num_features: int, r_max: Bound = 3.0, d_max: Bound = 5.0,
                 warmup_steps: int = DEFAULT_WARMUP_STEPS, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None, *,
                 bias: bool = True, impl: Impl = DEFAULT_IMPL) -> None:
        if not track_running_stats:
            raise ValueError("batch renormalization needs running statistics "
                             "(got track_running_stats=False)")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0 (got {warmup_steps!r})")
        _check_bounds(_bound_at(r_max, 0), _bound_at(d_max, 0),
                      "" if not (callable(r_max) or callable(d_max)) else " at step 0")
        if isinstance(r_max, Ramp) or isinstance(d_max, Ramp):
            _check_bounds(r_max.end if isinstance(r_max, Ramp) else _bound_at(r_max, 0),
                          d_max.end if isinstance(d_max, Ramp) else _bound_at(d_max, 0),
                          " at the end of the ramp")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype,
                         bias=bias, impl=impl)
        self.r_max = r_max
        self.d_max = d_max
        self.warmup_steps = warmup_steps

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_steps={self.warmup_steps}")

    def corrections(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r, d)`` for ``input`` against the current running statistics, detached."""
        step = int(self.num_batches_tracked)
        r_max, d_max = _bound_at(self.r_max, step), _bound_at(self.d_max, step)
        _check_bounds(r_max, d_max, f" at step {step}")
        dims = [0, *range(2, input.dim())]
        with torch.no_grad():
            var_b, mean_b = torch.var_mean(input, dim=dims, correction=0)  # (C,), (C,)
            sigma = torch.sqrt(self.running_var + self.eps)
            r = (torch.sqrt(var_b + self.eps) / sigma).clamp(1.0 / r_max, r_max)
            d = ((mean_b - self.running_mean) / sigma).clamp(-d_max, d_max)
        return r.to(input.dtype), d.to(input.dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        check_input(input, self.num_features, self.training)
        if not self.training:
            return functional_batch_norm(input, self.running_mean, self.running_var,
                                         self.weight, self.bias, False, 0.0, self.eps,
                                         impl=self.impl)
        weight, bias = self.weight, self.bias
        if int(self.num_batches_tracked) >= self.warmup_steps:
            r, d = self.corrections(input)  # checks the bounds before any buffer moves
            gamma = r if weight is None else weight * r
            shift = d if weight is None else weight * d
            weight, bias = gamma, shift if bias is None else shift + bias
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        return functional_batch_norm(input, self.running_mean, self.running_var, weight,
                                     bias, True, factor, self.eps, impl=self.impl)


class BatchRenorm1d(_BatchRenorm):
    """Batch renormalization over (N, C) or (N, C, L) input."""

    _ranks = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch renormalization over (N, C, H, W) input."""

    _ranks = (4,)
