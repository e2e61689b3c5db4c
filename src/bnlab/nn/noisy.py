"""Santurkar et al.'s "noisy" batch norm: BN followed by a random, time-varying distortion.

Why: Santurkar et al. (2018, Sec. 2.1) test whether BN helps *because* it keeps each
layer's input distribution stable. They inject, after every BN layer, noise that makes the
distribution of every activation unstable on purpose, and ask whether training still
benefits from BN. The noise must be

* i.i.d. per activation *and* per sample (one shift per channel would only move the
  channel as a whole, which the next layer can undo with its bias: a weaker test);
* of non-zero mean and non-unit scale;
* different at every step: its mean and scale are themselves re-drawn at every training
  forward, for every layer.

Parameterisation used here, with a strength ``S >= 0`` (a choice, stated in the report:
the paper gives the structure above, not a unique formula). At every training forward,
for this layer::

    mu_t    ~ U(-S, S)              # this step's mean shift
    sigma_t ~ U(1, 1 + S)           # this step's mean scale
    m[n, c, ...] ~ N(mu_t, S^2)     # per sample n and activation (c, ...)
    s[n, c, ...] ~ N(sigma_t, (S/2)^2)
    y <- y * s + m                  # y = BN's output, after gamma and beta

so E[m] = mu_t != 0 and E[s] = sigma_t != 1 move over time, and every activation of every
sample gets its own draw. ``S = 0`` gives m = 0, s = 1: exactly plain BN (no noise is drawn
at all then). In eval mode the noise is off: inference uses the running statistics and
nothing else, as in the paper (the noise is a training perturbation). Noise comes from
torch's global RNG, so a seeded run is reproducible.
"""

from __future__ import annotations

import torch

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d


def noise_like(y: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's ``(s, m)`` of :func:`noisy` for activations ``y``: both of ``y``'s shape."""
    mu = (torch.rand((), device=y.device) * 2 - 1) * strength  # U(-S, S)
    sigma = 1 + torch.rand((), device=y.device) * strength  # U(1, 1 + S)
    m = mu + strength * torch.randn_like(y)  # (N, C, ...) per sample and activation
    s = sigma + (strength / 2) * torch.randn_like(y)  # (N, C, ...)
    return s, m


def noisy(y: torch.Tensor, strength: float) -> torch.Tensor:
    """``y * s + m`` with this step's noise (:func:`noise_like`); ``y`` itself for S = 0."""
    if strength == 0:
        return y
    s, m = noise_like(y, strength)
    return y * s + m


class _NoisyMixin:
    """Adds the noise after a bnlab batch norm's output, in training mode only."""

    def __init__(self, num_features: int, strength: float = 1.0, **kwargs) -> None:
        if not strength >= 0:
            raise ValueError(f"expected noise strength >= 0 (got {strength})")
        super().__init__(num_features, **kwargs)
        self.strength = float(strength)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = super().forward(input)
        return noisy(out, self.strength) if self.training else out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise_strength={self.strength:g}"


class NoisyBatchNorm1d(_NoisyMixin, BatchNorm1d):
    """bnlab's BatchNorm1d, then Santurkar et al.'s noise (module docstring) while training."""


class NoisyBatchNorm2d(_NoisyMixin, BatchNorm2d):
    """bnlab's BatchNorm2d, then Santurkar et al.'s noise (module docstring) while training."""
