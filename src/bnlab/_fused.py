"""The fast batch norm: one ``torch.autograd.Function`` with a hand-derived backward.

Why a custom Function: letting autograd differentiate the textbook formula records every
intermediate (x - mean, its square, x_hat, x_hat * gamma, ...) and replays a backward op
for each; that is what made the chapter's scratch version 3-5x slower than torch's kernel.
Deriving the gradient by hand keeps one saved tensor and a few per-channel vectors, and
does each direction in a handful of passes over memory with plain tensor ops (no compiler
at run time; any device torch supports).

The math, per channel, with m values per channel (every dim but dim 1),
``sigma = sqrt(var + eps)`` and ``x_hat = (x - mean) / sigma``::

    forward   y = x_hat * gamma + beta
    backward  dbeta  = sum(dy)
              dgamma = sum(dy * x_hat)
              dx     = gamma / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat))   (training)
              dx     = dy * gamma / sigma_running                                    (eval)

How it is fast (each choice timed against its alternatives on the chapter's shapes,
interleaved, on 2 CPU cores):

* Per-channel statistics are plain ``tensor.sum(dims)`` (``var_mean`` over (0, 2, 3) of a
  (128, 6, 24, 24) tensor took 1.4 ms against 0.02 ms for ``sum``; ``einsum``,
  ``vector_norm`` and reshaping first were all slower).
* One full-size allocation per direction, as torch's kernel: forward computes the shifted
  input ``xk = x - shift_k`` into the output's buffer, takes the statistics from it (the
  sum of squares with ``_channel_dot``, which reads ``xk`` once and writes nothing), then
  scales it in place into ``y``; backward does the same in ``dx``'s buffer. Only ``x`` is
  saved (as torch saves it). A fresh full-size temporary costs page faults that outweighed
  the extra in-cache passes: saving ``xk`` instead measured 1.57-1.61x torch's fwd+bwd on
  (128, 6, 24, 24) and (64, 64, 32, 32), this layout 1.0-1.1x.
* ``y = xk * scale + shift`` and ``dx = xk * b + c + dy * scale`` (per-channel ``scale =
  gamma / sigma``, ``b``, ``c``) are in-place ``mul_`` / ``add_`` / ``addcmul_`` chains
  (``addcmul`` with two per-channel broadcast operands measured 3x slower than ``mul`` +
  ``add_``).
* Small inputs (the FC layers' (128, 120)) are dominated by per-op and Python overhead:
  (N, C) input in training takes its own path (``_train_forward_2d``) with about 10 ops per
  direction and no no-op conversions. Even so it stays ~1.9x torch's fwd+bwd there: a
  do-nothing Python ``autograd.Function`` costs ~40 us of torch's ~65 us, and each tensor
  op ~2-5 us more. ``impl="cpp"`` (``bnlab._cpp``) is the answer for those shapes.

Numerics (shifted data): the statistics are sums of ``xk = x - shift_k``, where
``shift_k`` is the per-channel mean of the first few samples of the batch, so ``xk`` is of
the size of the standard deviation, not of the mean. Then ``mean = shift_k + mean(xk)`` and
``var = mean(xk^2) - mean(xk)^2`` lose almost nothing: data with mean 1e4 and std 1 in
float32 is normalized about as exactly as float64 would (error ~1e-6, torch's ~3e-4),
where the naive ``E[x^2] - E[x]^2`` loses every digit. It also spares a full pass: no
separate ``sum(x)`` for the mean. float16/bfloat16 inputs are computed in float32 and
rounded once at the end (statistics and parameters in float32, as torch).

Double backward is not supported (the backward is ``once_differentiable``: asking for a
second derivative raises an error).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_REDUCE_DIMS = {ndim: (0, *range(2, ndim)) for ndim in range(2, 9)}
_CHANNEL_SHAPE = {ndim: (-1,) + (1,) * (ndim - 2) for ndim in range(2, 9)}
_SHIFT_SAMPLES = 8  # samples whose mean shifts the data before the statistics are summed


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the statistics are computed in: float32 for half/bfloat16 inputs (as torch)."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def reduce_dims(ndim: int) -> tuple[int, ...]:
    """Every dim but the channel dim 1."""
    return _REDUCE_DIMS[ndim]


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-channel ``sum(a * b)`` over every dim but 1, in one read pass and no temporary.

    ``linalg.vecdot`` over each (sample, channel) row of a contiguous (N, C, L) view, then
    a sum over N (a channels_last pair is an (N * L, C) matrix: one vecdot over rows).
    Timed against ``(a * b).sum(dims)`` in a reused buffer: 0.57x on (128, 6, 24, 24),
    0.59x on (128, 16, 8, 8), 0.39x on (64, 64, 32, 32).
    """
    n, c = a.shape[:2]
    if a.is_contiguous() and b.is_contiguous():
        return torch.linalg.vecdot(a.view(n, c, -1), b.view(n, c, -1), dim=2).sum(0)  # (N, C) -> (C,)
    rows_a, rows_b = a.movedim(1, -1), b.movedim(1, -1)  # (N, *, C)
    if rows_a.is_contiguous() and rows_b.is_contiguous():
        return torch.linalg.vecdot(rows_a.reshape(-1, c), rows_b.reshape(-1, c), dim=0)
    return torch.mul(a, b).sum(_REDUCE_DIMS[a.dim()])


def _scale_shift(invstd, weight, bias, center):
    """Per-channel ``scale = gamma * invstd`` and ``shift = beta - center * scale``, so that
    ``y = (x - center) * invstd * gamma + beta = x * scale + shift``."""
    scale = invstd if weight is None else invstd * _as(weight, invstd.dtype)
    if bias is None:
        return scale, torch.mul(center, scale).neg_()
    return scale, torch.addcmul(_as(bias, scale.dtype), center, scale, value=-1)


def _train_forward_2d(x, weight, bias, running_mean, running_var, momentum, eps):
    """Training forward for (N, C) input: y and the tensors backward needs.

    FC activations are small ((128, 120) in BN-LeNet), so time goes to per-op overhead,
    not memory: this path uses the fewest ops (an exact two-pass mean and variance,
    ``linalg.vecdot`` for the sum of squares, ~10 ops against ~20 in the general path)
    and keeps the centered input for backward.
    """
    count = x.shape[0]
    total = x.sum(0)  # (C,)
    centered = torch.sub(x, total, alpha=1.0 / count)  # (N, C): x - mean
    sq_dev = torch.linalg.vecdot(centered, centered, dim=0)  # (C,): sum (x - mean)^2
    # invstd = 1 / sqrt(sq_dev / m + eps) = sqrt(m) / sqrt(sq_dev + m * eps)
    invstd = torch.add(sq_dev, count * eps).rsqrt_().mul_(math.sqrt(count))
    if running_mean is not None:
        torch._foreach_mul_((running_mean, running_var), 1.0 - momentum)
        running_mean.add_(total, alpha=momentum / count)
        running_var.add_(sq_dev, alpha=momentum / (count - 1))  # unbiased variance
    scale = invstd if weight is None else invstd * _as(weight, invstd.dtype)
    y = torch.mul(centered, scale)
    if bias is not None:
        y.add_(_as(bias, y.dtype))
    return y, (centered, invstd, scale, None, None)


def _train_backward_2d(ctx, dy, centered, invstd, scale):
    """dx, dgamma, dbeta for :func:`_train_forward_2d` (dy: (N, C) in the stats dtype)."""
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    count = dy.shape[0]
    sum_dy = dy.sum(0)
    dw = torch.linalg.vecdot(dy, centered, dim=0).mul_(invstd)  # sum(dy * x_hat)
    dx = None
    if need_dx:  # (dy - mean(dy) - x_hat * mean(dy * x_hat)) * gamma * invstd
        dx = torch.sub(dy, centered * (dw * invstd), alpha=1.0 / count)
        dx = _as(dx.sub_(sum_dy, alpha=1.0 / count).mul_(scale), ctx.input_dtype)
    return (dx, _as(dw, ctx.weight_dtype) if need_dw else None,
            _as(sum_dy, ctx.weight_dtype) if need_db else None)


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
        ndim = x.dim()
        dims, shape = _REDUCE_DIMS[ndim], _CHANNEL_SHAPE[ndim]
        xs = x.float() if x.dtype in _LOW_PRECISION else x
        if training and ndim == 2:
            y, saved = _train_forward_2d(xs, weight, bias, running_mean, running_var,
                                         momentum, eps)
            ctx.save_for_backward(*saved)
        elif training:
            count = x.numel() // x.shape[1]
            shift_k = xs[:_SHIFT_SAMPLES].mean(dims)  # near the batch mean: from a few samples
            kv = shift_k.view(shape)
            y = torch.sub(xs, kv)  # the output's buffer; holds x - shift_k for now
            mean_k = y.sum(dims).div_(count)  # batch mean = shift_k + mean_k
            var = _channel_dot(y, y).div_(count).addcmul_(mean_k, mean_k, value=-1)
            invstd = var.add(eps).rsqrt_()
            if running_mean is not None:
                unbiased_var = var.mul_(count / (count - 1))
                torch._foreach_lerp_([running_mean, running_var],
                                     [_as(shift_k + mean_k, running_mean.dtype),
                                      _as(unbiased_var, running_var.dtype)], momentum)
            scale, shift = _scale_shift(invstd, weight, bias, mean_k)
            y.mul_(scale.view(shape)).add_(shift.view(shape))
            ctx.save_for_backward(x, invstd, scale, mean_k, shift_k)
        else:
            invstd = _as(running_var, xs.dtype).add(eps).rsqrt_()
            # A copy: the running mean may change in place before backward runs.
            offset = _as(running_mean, xs.dtype).clone()
            scale, shift = _scale_shift(invstd, weight, bias, offset)
            y = torch.mul(xs, scale.view(shape)).add_(shift.view(shape))
            keep = x if weight is not None and ctx.needs_input_grad[1] else None
            ctx.save_for_backward(keep, invstd, scale, offset, None)
        ctx.training = training
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.input_dtype = x.dtype
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        # Under create_graph=True the gradients must refuse a second differentiation:
        # once_differentiable does that, at ~15 us a call on (128, 120), so only then.
        if torch.is_grad_enabled():
            return _once_differentiable_backward(ctx, dy)
        return _backward(ctx, dy)


def _backward(ctx, dy):
    """dx, dgamma, dbeta (and None for the other inputs) of ``FusedBatchNorm``."""
    if dy is None:
        return (None,) * 8
    x, invstd, scale, offset, shift_k = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    ndim = dy.dim()
    dims, shape = _REDUCE_DIMS[ndim], _CHANNEL_SHAPE[ndim]
    dys = dy.float() if dy.dtype in _LOW_PRECISION else dy
    dx = dw = db = None
    if not ctx.training:  # y = x * scale + shift with constant statistics
        if need_db:
            db = _as(dys.sum(dims), ctx.weight_dtype)
        if need_dw:
            xs = x.float() if x.dtype in _LOW_PRECISION else x
            dot = torch.sub(xs, offset.view(shape)).mul_(dys).sum(dims)
            dw = _as(dot.mul_(invstd), ctx.weight_dtype)
        if need_dx:
            dx = _as(dys * scale.view(shape), dy.dtype)
        return dx, dw, db, None, None, None, None, None

    if ndim == 2:
        return (*_train_backward_2d(ctx, dys, x, invstd, scale), None, None, None, None, None)
    mean_k = offset  # x - mean = (x - shift_k) - mean_k
    count = dy.numel() // dy.shape[1]
    sum_dy = dys.sum(dims)
    if need_db:
        db = _as(sum_dy, ctx.weight_dtype)
    if not (need_dx or need_dw):
        return None, None, db, None, None, None, None, None
    xs = x.float() if x.dtype in _LOW_PRECISION else x
    kv = shift_k.view(shape)
    buf = torch.sub(xs, kv)  # (N, C, ...): dx's buffer; holds x - shift_k first
    dot = _channel_dot(buf, dys).addcmul_(mean_k, sum_dy, value=-1)  # sum(dy * (x - mean))
    if need_dw:
        dw = _as(dot * invstd, ctx.weight_dtype)  # sum(dy * x_hat)
    if need_dx:
        # dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat))
        #    = (x - shift_k) * b + c + dy * scale
        b = (invstd * invstd).mul_(scale).mul_(dot).mul_(-1.0 / count)
        c = torch.mul(scale, sum_dy).mul_(-1.0 / count).addcmul_(b, mean_k, value=-1)
        dx = buf.mul_(b.view(shape)).add_(c.view(shape))
        dx.addcmul_(dys, scale.view(shape))
        dx = _as(dx, dy.dtype)
    return dx, dw, db, None, None, None, None, None


_once_differentiable_backward = once_differentiable(_backward)


def fused_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """The fast path without argument checks (callers have checked)."""
    if running_mean is None or running_var is None:
        running_mean = running_var = None
    return FusedBatchNorm.apply(input, weight, bias, running_mean, running_var, training,
                                momentum, eps)
