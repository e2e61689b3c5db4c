"""Ghost batch norm (Hoffer, Hubara & Soudry 2017): batch norm over virtual sub-batches.

Why: large batches generalize worse, and part of the cause is that batch norm's noise
shrinks as the batch grows. Ghost batch norm keeps the large batch for the gradient
step but normalizes each consecutive chunk of ``virtual_batch_size`` samples with that
chunk's own statistics, so the normalization noise is that of the small batch.

Formula, in training, for the chunk ``x_k = x[k*v : (k+1)*v]`` (v = virtual_batch_size;
the last chunk may be smaller) and each channel c::

    y_k = (x_k - mean(x_k)) / sqrt(var(x_k) + eps) * gamma + beta

with ``mean``/``var`` the chunk's mean and biased variance over every dim but dim 1.
The running statistics are updated once per chunk, in order, with bnlab's (torch's)
rule ``running = (1 - momentum) * running + momentum * chunk_stat`` (variance stored
unbiased) and ``num_batches_tracked`` counts chunks: a batch of 128 with
``virtual_batch_size=32`` moves them exactly as four 32-sample BN steps would, and
``momentum=None`` averages over all chunks seen. A chunk with a single value per channel
(an (N, C) chunk of one sample) is an error, as it is for batch norm; the whole batch is
checked before any buffer moves.

Prediction (``eval()``) is plain batch norm with the running statistics. Without running
statistics (``track_running_stats=False``) every mode uses the chunks' statistics.

Each chunk goes through ``bnlab.functional.batch_norm`` (the layer's ``impl``); only the
split into chunks is new here.
"""

from __future__ import annotations

from typing import Any

import torch

from bnlab.functional import DEFAULT_IMPL, Impl, check_input
from bnlab.functional import batch_norm as functional_batch_norm
from bnlab.nn.batchnorm import _BatchNorm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d"]


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
        update = self.training and self.track_running_stats
        outputs = []
        for chunk in chunks:
            factor = 0.0 if self.momentum is None else self.momentum
            if update:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative average over chunks
                    factor = 1.0 / float(self.num_batches_tracked)
            outputs.append(functional_batch_norm(
                chunk, self.running_mean if update else None,
                self.running_var if update else None, self.weight, self.bias, True, factor,
                self.eps, impl=self.impl))
        return torch.cat(outputs)  # (N, C, ...)


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost batch norm over (N, C) or (N, C, L) input; chunks along N."""

    _ranks = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost batch norm over (N, C, H, W) input; chunks along N."""

    _ranks = (4,)
