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

Each chunk goes through ``bnlab.functional.batch_norm`` (the layer's ``impl``), which also
returns the chunk's statistics (through buffers it updates with momentum 1); only the split
into chunks and the average of their statistics are new here.
"""

from __future__ import annotations

from typing import Any

import torch

from bnlab.functional import DEFAULT_IMPL, Impl, check_input
from bnlab.functional import batch_norm as functional_batch_norm
from bnlab.nn.batchnorm import _BatchNorm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "step_statistics"]


def step_statistics(means: list[torch.Tensor], variances: list[torch.Tensor],
                    sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step_mean, step_var)`` of the module docstring, each (C,): the chunks' means and
    unbiased variances averaged with weights ``n_k / N`` (``sizes``: the n_k)."""
    weights = torch.tensor(sizes, dtype=means[0].dtype, device=means[0].device)
    weights = (weights / weights.sum()).unsqueeze(1)  # (K, 1)
    return (torch.stack(means) * weights).sum(0), (torch.stack(variances) * weights).sum(0)


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
        if not (self.training and self.track_running_stats):
            return torch.cat([functional_batch_norm(chunk, None, None, self.weight, self.bias,
                                                    True, 0.0, self.eps, impl=self.impl)
                              for chunk in chunks])  # (N, C, ...)
        outputs, means, variances = [], [], []
        for chunk in chunks:
            # With momentum 1 the kernel leaves exactly the chunk's mean and unbiased variance
            # in these (C,) buffers: the statistics it normalized with, without a second pass.
            mean, var = torch.zeros_like(self.running_mean), torch.zeros_like(self.running_var)
            outputs.append(functional_batch_norm(chunk, mean, var, self.weight, self.bias, True,
                                                 1.0, self.eps, impl=self.impl))
            means.append(mean)
            variances.append(var)
        self._update_running_stats(means, variances, [len(c) for c in chunks])
        return torch.cat(outputs)  # (N, C, ...)

    def _update_running_stats(self, means: list[torch.Tensor], variances: list[torch.Tensor],
                              sizes: list[int]) -> None:
        """One update from the chunks' mean statistics (see the module docstring)."""
        self.num_batches_tracked.add_(1)
        if not sum(sizes):  # an empty batch has no statistics: counted, as batch norm does
            return
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        mean, var = step_statistics(means, variances, sizes)
        with torch.no_grad():
            self.running_mean.mul_(1 - factor).add_(factor * mean)
            self.running_var.mul_(1 - factor).add_(factor * var)


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost batch norm over (N, C) or (N, C, L) input; chunks along N."""

    _ranks = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost batch norm over (N, C, H, W) input; chunks along N."""

    _ranks = (4,)
