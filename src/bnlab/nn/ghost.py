"""Ghost batch norm (Hoffer, Hubara & Soudry 2017): batch norm over virtual sub-batches.

Why: large batches generalize worse, and part of the cause is that batch norm's noise
shrinks as the batch grows. Ghost batch norm keeps the large batch for the gradient
step but normalizes each consecutive chunk of ``virtual_batch_size`` samples with that
chunk's own statistics, so the normalization noise is that of the small batch.

Formula, in training, for the chunk ``x_k = x[k*v : (k+1)*v]`` (v = virtual_batch_size;
the last chunk may be smaller) and each channel c::

    y_k = (x_k - mean(x_k)) / sqrt(var(x_k) + eps) * gamma + beta

with ``mean``/``var`` the chunk's mean and biased variance over every dim but dim 1.

Running statistics: **one update per forward (per SGD step), from the chunks' mean
statistics**. With ``n_k`` samples in chunk k (N in all), ``mu_k`` its mean and ``s2_k``
its unbiased variance (over its ``n_k * H * W`` values per channel)::

    step_mean = sum_k n_k mu_k / N          (= the whole batch's mean)
    step_var  = sum_k n_k s2_k / N          (the chunks' mean unbiased variance)
    running   = (1 - momentum) * running + momentum * step_stat

``num_batches_tracked`` counts forwards, as batch norm's does, and ``momentum=None``
averages over all forwards (factor ``1 / num_batches_tracked``). With one chunk (v >= N)
this is exactly batch norm's update. The update is linear in the chunk statistics, so with
equal chunks it equals keeping one average per chunk position and averaging those at
prediction (the GhostBatchNorm of Page's "How to train your ResNet", myrtle.ai).

Why this definition and not one update per chunk: Hoffer et al.'s Algorithm 1 updates
the running statistics once per ghost batch, in turn, with the same momentum. At v = 2
and batch 128 that is 64 updates a step: momentum 0.1 then averages over the last ~20
chunks, about 40 samples, where batch norm's average spans ~20 steps of 128 samples. The
weights do not move between the chunks of a step, so the extra updates add no recency;
they only shrink the sample the estimate rests on, and eval-mode accuracy then measures
the estimator's noise rather than the training. Wu & Johnson (2021) judge small
normalization batches with population statistics (precise BN); the running statistics
here rest on as many samples per update as batch norm's at the same SGD batch, whatever
v is, and estimate the population's variance (each ``s2_k`` is unbiased for it). The
other candidate, one update per chunk with momentum ``1 - (1 - momentum)^(1/chunks)``,
spans about as many samples but weights the chunks of one step unequally, for no reason
the training gives.

A chunk with a single value per channel (an (N, C) chunk of one sample) is an error, as it
is for batch norm; the whole batch is checked before any buffer moves.

Prediction (``eval()``) is plain batch norm with the running statistics. Without running
statistics (``track_running_stats=False``) every mode uses the chunks' statistics.

Each chunk goes through ``bnlab.functional.batch_norm`` (the layer's ``impl``); only the
split into chunks and the update of the running statistics are new here.
"""

from __future__ import annotations

from typing import Any

import torch

from bnlab.functional import DEFAULT_IMPL, Impl, check_input
from bnlab.functional import batch_norm as functional_batch_norm
from bnlab.nn.batchnorm import _BatchNorm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "chunk_statistics"]


@torch.no_grad()
def chunk_statistics(x: torch.Tensor, virtual_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step_mean, step_var)`` of the module docstring, each (C,), for ``x`` (N, C, ...)
    cut into chunks of ``virtual_batch_size`` along N: the chunks' means and unbiased
    variances averaged with weights ``n_k / N``. Computed in float32 for half inputs (as the
    kernels do), else in ``x``'s dtype; every chunk must have two or more values per channel."""
    x = x.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    n, v = x.shape[0], virtual_batch_size
    full = n // v  # whole chunks, then a smaller last one of n - full * v samples
    mean_sum = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)  # (C,)
    var_sum = torch.zeros_like(mean_sum)
    if full:
        chunks = x[:full * v].reshape(full, v, *x.shape[1:])  # (K, v, C, ...)
        var, mean = torch.var_mean(chunks, dim=[1, *range(3, chunks.dim())], correction=1)  # (K, C)
        mean_sum += mean.sum(0) * v
        var_sum += var.sum(0) * v
    if rest := n - full * v:
        var, mean = torch.var_mean(x[full * v:], dim=[0, *range(2, x.dim())], correction=1)  # (C,)
        mean_sum += mean * rest
        var_sum += var * rest
    return mean_sum / n, var_sum / n


class _GhostBatchNorm(_BatchNorm):
    """Shared body of GhostBatchNorm1d/2d; see the module docstring."""

    _extra_args = ("virtual_batch_size",)  # constructor arguments beyond BN's (frozen.py)

    def __init__(self, num_features: int, virtual_batch_size: int = 32, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None, *,
                 bias: bool = True, impl: Impl = DEFAULT_IMPL) -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) \
                or virtual_batch_size < 2:
            raise ValueError("virtual_batch_size must be an integer >= 2 (a chunk of one "
                             f"sample has no batch statistics) (got {virtual_batch_size!r})")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias, impl=impl)
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or not self.track_running_stats
        check_input(input, self.num_features, False)
        if not use_batch_stats:  # prediction: plain batch norm with the running statistics
            return functional_batch_norm(input, self.running_mean, self.running_var,
                                         self.weight, self.bias, False, 0.0, self.eps,
                                         impl=self.impl)
        chunks = torch.split(input, self.virtual_batch_size)  # each (<= v, C, ...)
        for chunk in chunks:  # every chunk checked before any buffer moves
            check_input(chunk, self.num_features, True)
        if self.training and self.track_running_stats:
            self._update_running_stats(input)
        return torch.cat([functional_batch_norm(chunk, None, None, self.weight, self.bias, True,
                                                0.0, self.eps, impl=self.impl)
                          for chunk in chunks])  # (N, C, ...)

    def _update_running_stats(self, input: torch.Tensor) -> None:
        """One update from the chunks' mean statistics (see the module docstring)."""
        self.num_batches_tracked.add_(1)
        if input.shape[0] == 0:  # an empty batch has no statistics: counted, as batch norm does
            return
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        mean, var = chunk_statistics(input, self.virtual_batch_size)
        with torch.no_grad():  # in the statistics' precision, then stored (as the kernels)
            self.running_mean.copy_((1 - factor) * self.running_mean.to(mean.dtype) + factor * mean)
            self.running_var.copy_((1 - factor) * self.running_var.to(var.dtype) + factor * var)


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost batch norm over (N, C) or (N, C, L) input; chunks along N."""

    _ranks = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost batch norm over (N, C, H, W) input; chunks along N."""

    _ranks = (4,)
