"""The reference batch norm: the chapter's math, line by line, differentiated by autograd.

Per channel c (dim 1; the statistics run over every other dim, m values per channel)::

    mean = sum(x) / m
    var  = sum((x - mean)^2) / m                      # biased: divides by m
    y    = (x - mean) / sqrt(var + eps) * gamma + beta

in training; in prediction the running statistics take the place of ``mean`` and ``var``.
Training also moves the running statistics towards the batch's (the variance unbiased,
``var * m / (m - 1)``)::

    running = (1 - momentum) * running + momentum * batch

Why keep it next to the fast path: it is the version a reader can check against the
formula at a glance, and the tests hold the fast path to it (and both to torch). It is
deliberately plain and stands alone (it imports nothing from the other implementations);
speed is ``bnlab.kernels.fused``'s and ``bnlab.kernels.cpp``'s job.
"""

from __future__ import annotations

import torch


def reference_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """y = (x - mean) / sqrt(var + eps) * gamma + beta, stats per channel (dim 1)."""
    out_dtype = x.dtype
    if x.dtype in (torch.float16, torch.bfloat16):  # half precision: compute in float32
        x = x.float()
    dims = (0, *range(2, x.dim()))  # every dim but the channels (dim 1)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)  # broadcasts a per-channel vector
    if training:
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)  # biased: divides by m
        # An empty batch has no statistics to average in: the running ones stay.
        if running_mean is not None and running_var is not None and x.numel() > 0:
            m = x.numel() // x.shape[1]
            with torch.no_grad():  # the running averages are not part of the graph
                new_mean = mean.reshape(-1).to(running_mean.dtype)
                new_var = (var.reshape(-1) * m / (m - 1)).to(running_var.dtype)  # unbiased
                running_mean.mul_(1 - momentum).add_(momentum * new_mean)
                running_var.mul_(1 - momentum).add_(momentum * new_var)
    else:
        mean = running_mean.reshape(shape).to(x.dtype)
        var = running_var.reshape(shape).to(x.dtype)
    x_hat = (x - mean) / torch.sqrt(var + eps)
    y = x_hat
    if weight is not None:
        y = y * weight.reshape(shape).to(x.dtype)
    if bias is not None:
        y = y + bias.reshape(shape).to(x.dtype)
    return y.to(out_dtype)
