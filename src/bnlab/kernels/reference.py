"""The reference batch norm: the chapter's math, line by line, differentiated by autograd.

Per channel c (dim 1; the statistics run over every other dim, m values per channel)::

    mean = sum(x) / m
    var  = sum((x - mean)^2) / m                      # biased: divides by m
    y    = (x - mean) / sqrt(var + eps) * gamma + beta

in training; in prediction the running statistics take the place of ``mean`` and ``var``.
Training also moves the running statistics towards the batch's (the variance unbiased,
``var * m / (m - 1)``)::

    running = (1 - momentum) * running + momentum * batch

Numerics: the sums run over ``x - shift``, with ``shift`` the first sample's mean per
channel (any value gives the same math), so they are of the size of the spread, not of
the mean: data with a mean of 1e8 keeps the digits of its variance, where ``x - mean(x)``
would inherit the rounding error of a mean that large.

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
        # (1, C, 1, ...): the first sample's mean; y does not depend on it (a constant to autograd)
        shift = x[:1].mean(dim=dims, keepdim=True).detach()
        centered = x - shift
        mean_centered = centered.mean(dim=dims, keepdim=True)  # mean = shift + mean_centered
        deviation = centered - mean_centered  # x - mean
        var = (deviation ** 2).mean(dim=dims, keepdim=True)  # biased: divides by m
        # An empty batch has no statistics to average in: the running ones stay.
        if running_mean is not None and running_var is not None and x.numel() > 0:
            m = x.numel() // x.shape[1]
            with torch.no_grad():  # the running averages are not part of the graph
                new_mean = (shift + mean_centered).reshape(-1)
                new_var = var.reshape(-1) * m / (m - 1)  # unbiased
                # In x's precision (float32 for half buffers, as torch), then stored.
                running_mean.copy_((1 - momentum) * running_mean.to(x.dtype) + momentum * new_mean)
                running_var.copy_((1 - momentum) * running_var.to(x.dtype) + momentum * new_var)
    else:
        deviation = x - running_mean.reshape(shape).to(x.dtype)
        var = running_var.reshape(shape).to(x.dtype)
    x_hat = deviation / torch.sqrt(var + eps)
    y = x_hat
    if weight is not None:
        y = y * weight.reshape(shape).to(x.dtype)
    if bias is not None:
        y = y + bias.reshape(shape).to(x.dtype)
    return y.to(out_dtype)
