"""The fast batch norm: one ``torch.autograd.Function`` with a hand-derived backward.

Why a custom Function: letting autograd differentiate the textbook formula records
every intermediate (x - mean, its square, x_hat, x_hat * gamma, ...) and replays a
backward op for each; that is what made the chapter's scratch version 3-5x slower
than torch's kernel. Deriving the gradient by hand lets us keep only the input and
two per-channel vectors for backward, and do both directions in a handful of passes
over memory with plain tensor ops (no compiler needed at run time; works on any
device torch supports).

The math, per channel, with M values per channel (all dims but dim 1), and
sigma = sqrt(var + eps):

    forward   y  = (x - mean) / sigma * gamma + beta = x * scale + shift,
              scale = gamma / sigma,   shift = beta - mean * scale
    backward  dbeta  = sum(dy)
              dgamma = sum(dy * x_hat)
              dx     = gamma / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat))   (training)
              dx     = dy * gamma / sigma_running                                    (eval)

Choices below were made by timing the candidates on the chapter's shapes
((128, 6, 24, 24), (128, 16, 8, 8), (128, 120), (128, 84)) and (64, 64, 32, 32), on
2 CPU cores, interleaved (medians, ms; the machine was shared, so only ratios count):

* per-channel sums: ``x.sum(dims)`` 0.02 / 0.02 / 0.5 ms (on 128x6x24x24 / 128x16x8x8
  / 64x64x32x32) against ``torch.var_mean`` 1.4 / 0.40 / 27 ms,
  ``linalg.vector_norm`` 0.21 / 0.09 / 6.5 ms, reshaping to (N, C, -1) first
  0.06 / 0.03 / 4.2 ms, ``einsum('nc...,nc...->c')`` 1.3 / 0.7 / 40 ms, a float64
  accumulating sum 0.16 / 0.06 / 7.2 ms and a batched-dot ``bmm`` 0.30 / 0.05 / 2.5 ms.
  So every statistic is ``tensor.sum(dims)`` of something.
* variance by two passes (a first mean, then deviations from it), plus the mean of the
  deviations as a correction of the first mean: a float32 sum of 1e4-sized values loses
  digits (torch's CPU kernel accumulates in float64 instead; a float64-accumulating
  sum measured 8x slower than the float32 sum plus one more sum over the deviations).
  The deviations are squared IN PLACE in the buffer that then receives the output, so
  the forward allocates one full-size tensor, like torch's.
* output as ``addcmul(beta - resid * scale, x - mean_hi, scale)`` written into that
  buffer. The cheaper ``addcmul(shift, x, scale)`` (one pass less, ~0.08 ms on
  128x6x24x24) measured 1-2e-3 absolute error at mean 1e4 (torch: 3-8e-4); this form
  measures ~1e-6.
* backward saves ``x`` (alive anyway for the previous layer), not a new x_hat, and forms
  ``x - mean_hi`` once, multiplies it by dy in place and sums: ``sum(dy * (x - mean))``
  computed directly, not as ``sum(dy*x) - mean*sum(dy)`` (measured: dgamma error 0.05-0.15
  at mean 1e4 against torch's 0.01; this form 1e-5). ``dx = dy * a + x * b + c`` is then
  two ``addcmul`` into that same buffer: one full-size allocation, like torch's.
* known cost: every op is a separate dispatch (~2-5 us each on this machine), so on
  small 2D inputs such as (128, 120) the Python-level op count, not memory traffic,
  decides (about 2.8x torch's single fused kernel there).

Double backward is not supported (the backward is ``once_differentiable``; asking for
a second derivative raises a clear error).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the statistics are computed in: float32 for half/bfloat16 inputs (as torch)."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def reduce_dims(ndim: int) -> tuple[int, ...]:
    """Every dim but the channel dim 1."""
    return (0, *range(2, ndim))


class FusedBatchNorm(torch.autograd.Function):
    """Batch norm with an analytic backward.

    ``apply(x, weight, bias, running_mean, running_var, training, momentum, eps)``.
    In training the batch statistics normalize and, if given, the running statistics
    are updated in place (variance unbiased); otherwise the running statistics
    normalize. Arguments are not checked here: ``bnlab.functional`` does that.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        ctx.set_materialize_grads(False)
        sdt = stat_dtype(x.dtype)
        dims = reduce_dims(x.dim())
        channels = x.shape[1]
        view = (channels,) + (1,) * (x.dim() - 2)
        count = x.numel() // channels
        if training:
            # Pass 1: a first mean.  Pass 2: deviations from it (exact in floating
            # point), whose own mean is the first mean's rounding error (float32 sums of
            # large values lose digits; torch accumulates in float64 instead).  Pass 3:
            # squared deviations, squared in place in the buffer that later holds y.
            mean_hi = x.sum(dims, dtype=sdt if sdt != x.dtype else None).div_(count)
            buf = x - mean_hi.view(view)
            resid = buf.sum(dims).div_(count)
            buf.mul_(buf)
            var = torch.addcmul(buf.sum(dims).div_(count), resid, resid, value=-1)
            mean = mean_hi + resid
            invstd = torch.rsqrt(var + eps)
            if running_mean is not None:
                torch._foreach_lerp_(
                    [running_mean, running_var],
                    [mean.to(running_mean.dtype),
                     var.mul_(count / (count - 1)).to(running_var.dtype)],
                    momentum)
        else:
            # A copy: the running buffers may change in place before backward runs.
            mean = mean_hi = running_mean.to(sdt, copy=True)
            resid = None
            invstd = torch.rsqrt(running_var.to(sdt) + eps)
        scale = invstd if weight is None else invstd * weight.to(sdt)
        beta = None if bias is None else bias.to(sdt)
        if training:
            # y = (x - mean_hi) * scale + (beta - resid * scale): no large cancellation
            # (x * scale + (beta - mean * scale) loses float32 digits for a large mean).
            src, offset = torch.sub(x, mean_hi.view(view), out=buf), resid
            out = buf if buf.dtype == x.dtype else torch.empty_like(x)
        else:
            src, offset, out = x, mean, torch.empty_like(x)
        if beta is None:
            shift = torch.mul(offset, scale).neg_()
        else:
            shift = torch.addcmul(beta, offset, scale, value=-1)
        y = torch.addcmul(shift.view(view), src, scale.view(view), out=out)

        ctx.training = training
        ctx.weight_dtype = None if weight is None else weight.dtype
        need_x = training or (weight is not None and ctx.needs_input_grad[1])
        ctx.save_for_backward(x if need_x else None, mean, invstd, scale, mean_hi, resid)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        if dy is None:
            return (None,) * 8
        x, mean, invstd, scale, mean_hi, resid = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        sdt = invstd.dtype
        dims = reduce_dims(dy.dim())
        channels = dy.shape[1]
        view = (channels,) + (1,) * (dy.dim() - 2)
        wide = sdt if sdt != dy.dtype else None
        dx = dw = db = None
        training = ctx.training
        sum_dy = None
        if need_db or (training and need_dx):
            sum_dy = dy.sum(dims, dtype=wide)
        if need_db:
            db = sum_dy.to(ctx.weight_dtype or sdt)

        if not training:
            if need_dw:
                prod = x - mean.view(view)
                prod.mul_(dy)
                dw = prod.sum(dims).mul_(invstd).to(ctx.weight_dtype)
            if need_dx:
                dx = torch.mul(dy, scale.view(view)).to(dy.dtype)
            return dx, dw, db, None, None, None, None, None

        if not (need_dx or need_dw):
            return dx, dw, db, None, None, None, None, None
        count = dy.numel() // channels
        if sum_dy is None:
            sum_dy = dy.sum(dims, dtype=wide)
        # sum(dy * (x - mean)) = sum(dy * (x - mean_hi)) - resid * sum(dy): the product
        # of small deviations, not sum(dy * x) - mean * sum(dy), which cancels
        # catastrophically in float32 when the mean is large.
        prod = x - mean_hi.view(view)
        prod.mul_(dy)
        dot = torch.addcmul(prod.sum(dims), resid, sum_dy, value=-1)
        dot.mul_(invstd)  # = sum(dy * x_hat) = dgamma
        if need_dw:
            dw = dot.to(ctx.weight_dtype)
        if need_dx:
            # dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat))
            #    = scale * dy + b * x + c,  b = -scale * invstd * mean(dy * x_hat),
            #                               c = -scale * mean(dy) - b * mean
            b = dot.mul(invstd).mul_(scale).mul_(-1.0 / count)
            c = torch.addcmul(torch.mul(scale, sum_dy).mul_(-1.0 / count), b, mean, value=-1)
            # Both addcmuls write into the product buffer: no new allocation.  For
            # half/bfloat16 that buffer is float32, so the result is rounded once.
            dx = torch.addcmul(c.view(view), x, b.view(view), out=prod)
            dx.addcmul_(dy, scale.view(view))
            if dx.dtype != dy.dtype:
                dx = dx.to(dy.dtype)
        return dx, dw, db, None, None, None, None, None
