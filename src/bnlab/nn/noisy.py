"""Santurkar et al.'s "noisy" batch norm: BN followed by a random, time-varying distortion.

Why: Santurkar et al. (2018, Sec. 2.1) test whether BN helps *because* it keeps each
layer's input distribution stable. After every BN layer they inject "time-varying,
non-zero mean and non-unit variance noise", so that the distribution each unit hands on
moves from step to step far more than it would without BN, and ask whether training still
benefits from BN. What makes it *covariate shift* is the time variation: a distortion of
each unit's mean and scale that changes at every step. Per-sample noise of a fixed
distribution would be a regulariser, not a shift, so here it is kept small.

Parameterisation, with a strength ``S >= 0`` (the paper gives the structure, not a unique
formula; these constants are the lab's, stated in the ``ics`` report). At every training
forward, for this layer and every unit ``c`` (a channel of a conv layer)::

    mu_t[c]    ~ U(-S, S)                              # this step's shift of unit c
    sigma_t[c] ~ U(1, 1 + S)                           # this step's scale of unit c
    m[n, c, ...] = mu_t[c]    + JITTER * S * z         # z ~ N(0, 1), per sample and
    s[n, c, ...] = sigma_t[c] + JITTER * S * z'        #   activation, independent
    y <- y * s + m                                     # y: BN's output, after gamma, beta

``JITTER = 0.1``: the per-sample noise (standard deviation 0.1 S) is small next to the shift
of a unit's mean from one step to the next (``E|mu_t+1 - mu_t| = 2S/3``, about 7 times
larger; its scale moves by ``E|sigma_t+1 - sigma_t| = S/3``). With ``scope="layer"`` one
``mu_t`` and one ``sigma_t`` are drawn for all units of the layer instead of one per unit.
``S = 0`` is exactly plain BN (no noise is drawn at all then). Noise comes from torch's
global RNG, so a seeded run is reproducible.

In eval mode the layer applies the distortion's expectation, ``y * (1 + S/2)``
(``E[mu_t] = 0``, ``E[sigma_t] = 1 + S/2``): the next layer was trained on inputs scaled by
``sigma_t``, on average ``1 + S/2``, so switching the noise off would shrink its input by
that factor and judge the net on inputs it never saw (as dropout rescales at inference).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d

JITTER = 0.1
"""Standard deviation of the per-sample noise, in units of the strength S."""
SCOPES = ("unit", "layer")
"""``unit``: a shift and scale drawn per unit (channel) every step; ``layer``: one per layer."""


def _check(strength: float, scope: str) -> None:
    if not strength >= 0:
        raise ValueError(f"expected noise strength >= 0 (got {strength})")
    if scope not in SCOPES:
        raise ValueError(f"expected noise scope in {SCOPES} (got {scope!r})")


def noise_like(y: torch.Tensor, strength: float, scope: str = "unit"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's ``(s, m)`` of :func:`noisy` for activations ``y`` ``(N, C, ...)``: both of
    ``y``'s shape."""
    _check(strength, scope)
    units = y.shape[1] if scope == "unit" else 1
    shape = (1, units) + (1,) * (y.dim() - 2)  # broadcasts over the samples (and H, W)
    mu = (torch.rand(shape, device=y.device, dtype=y.dtype) * 2 - 1) * strength  # U(-S, S)
    sigma = 1 + torch.rand(shape, device=y.device, dtype=y.dtype) * strength  # U(1, 1 + S)
    m = mu + JITTER * strength * torch.randn_like(y)  # (N, C, ...) per sample and activation
    s = sigma + JITTER * strength * torch.randn_like(y)  # (N, C, ...)
    return s, m


def noisy(y: torch.Tensor, strength: float, scope: str = "unit") -> torch.Tensor:
    """``y * s + m`` with this step's noise (:func:`noise_like`); ``y`` itself for S = 0."""
    if strength == 0:
        return y
    s, m = noise_like(y, strength, scope)
    return y * s + m


def expected(y: torch.Tensor, strength: float) -> torch.Tensor:
    """The distortion's expectation over the noise: ``E[y * s + m] = y * (1 + S/2)``."""
    return y * (1 + strength / 2) if strength else y


class _NoisyMixin:
    """Adds the distortion after a bnlab batch norm's output while training, and its
    expectation in eval mode."""

    def __init__(self, num_features: int, strength: float = 1.0, scope: str = "unit",
                 **kwargs) -> None:
        _check(strength, scope)
        super().__init__(num_features, **kwargs)
        self.strength = float(strength)
        self.scope = scope

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = super().forward(input)
        if self.training:
            return noisy(out, self.strength, self.scope)
        return expected(out, self.strength)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise_strength={self.strength:g}, scope={self.scope}"


class NoisyBatchNorm1d(_NoisyMixin, BatchNorm1d):
    """bnlab's BatchNorm1d, then Santurkar et al.'s distortion (module docstring)."""


class NoisyBatchNorm2d(_NoisyMixin, BatchNorm2d):
    """bnlab's BatchNorm2d, then Santurkar et al.'s distortion (module docstring)."""


@contextmanager
def without_noise(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every noisy batch norm of ``model`` is plain BN (strength 0): the
    noise-free output, e.g. as the reference a measured shift is divided by; restored after."""
    layers = [m for m in model.modules() if isinstance(m, _NoisyMixin)]
    strengths = [m.strength for m in layers]
    try:
        for m in layers:
            m.strength = 0.0
        yield model
    finally:
        for m, strength in zip(layers, strengths, strict=True):
            m.strength = strength
