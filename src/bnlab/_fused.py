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
interleaved with torch's kernel, on 2 CPU cores):

* Per-channel statistics are plain reductions. A contiguous (N, C, ...) tensor is viewed
  as (N, C, L) and reduced over the contiguous L first (``var_mean`` over (0, 2, 3) of a
  (128, 6, 24, 24) tensor took 1.4 ms against 0.02 ms for ``sum``). The sum of squares is
  ``vector_norm`` over L, squared: it squares inside the reduction and writes nothing,
  where ``vecdot`` or ``(x * x).sum()`` materialize a full-size product.
* No full-size temporary, only the buffer each direction must return: forward writes
  ``x - shift_k`` into the output's buffer, takes the statistics from it and scales it in
  place into ``y``; backward forms ``dy * (x - shift_k)`` in dx's buffer, sums it, then
  refills the buffer with ``x - shift_k`` and turns it into dx in place. A fresh
  full-size tensor costs page faults (~0.5 us per 4 KiB page) that outweigh an extra
  pass over memory that is in cache: (64, 64, 32, 32) went from 1.17x torch's fwd+bwd with
  one temporary per direction to 0.68x without.
* ``y = xk * scale + shift`` and ``dx = xk * b + c + dy * scale`` (per-channel ``scale =
  gamma / sigma``, ``b``, ``c``) are in-place ``mul_`` / ``add_`` / ``addcmul_`` chains
  (``addcmul`` with two per-channel broadcast operands measured 3x slower than ``mul`` +
  ``add_``).
* Per-channel arithmetic takes no Python floats as operands (each is wrapped into a new
  tensor and cast, ~2 us an op on a (C,) vector): constants are cached 0-dim tensors
  (``_scalar``) or ``alpha=`` / ``value=`` arguments, and both running buffers are updated
  by two ``_foreach`` ops.
* The Function is entered through the C++ ``apply`` under ``Function.apply``
  (``fused_batch_norm``; the public one under functorch transforms and ``torch.compile``).
  The Python wrapper binds default arguments and walks every argument for functorch:
  10-20 us a call, which took (128, 120) from 1.67x torch's fwd+bwd to 1.48x and
  (128, 16, 8, 8) from 1.52x to 1.47x (interleaved A/B in one process).
* Small inputs (the FC layers' (128, 120)) are dominated by per-op and Python overhead:
  (N, C) input in training takes its own path (``_train_forward_2d``) with 9 ops forward
  and 6 backward, and still takes 1.4-1.7x torch's fwd+bwd there. Timed alone on
  (128, 120): torch's fwd+bwd 62 us; a do-nothing Python Function 32 us; the 15 ops'
  own times, each op timed alone, add up to ~38 us; our fwd+bwd 113-120 us, because
  inside a fwd+bwd each op and the Function's backward call take longer than alone
  (forward body 27 us alone, backward body 20 us; a backward that returns without
  computing still took 49 us after that forward, against 25 us after a do-nothing one).
  ``impl="cpp"`` (``bnlab._cpp``) is the answer for those shapes.

Numerics (shifted data): the statistics are sums of ``xk = x - shift_k``, where
``shift_k`` is the per-channel mean of the first few samples of the batch, so ``xk`` is of
the size of the standard deviation, not of the mean. Then ``mean = shift_k + mean(xk)`` and
``var = mean(xk^2) - mean(xk)^2`` lose almost nothing: data with mean 1e4 and std 1 in
float32 is normalized about as exactly as float64 would (error ~1e-6, torch's ~3e-4),
where the naive ``E[x^2] - E[x]^2`` loses every digit. Backward works on ``x - shift_k``
too, so dx is as exact (~1e-6 there; folding the shift into a per-channel constant would
save a pass but measured torch's 3e-5). (N, C) input uses an exact two-pass mean and
variance instead. float16/bfloat16 inputs are computed in float32 and rounded once at
the end (statistics and parameters in float32, as torch).

Double backward is not supported (the backward is ``once_differentiable``: asking for a
second derivative raises an error).
"""

from __future__ import annotations

import functools

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


def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``value`` as a cached 0-dim tensor, an operand torch uses as it is.

    A Python float operand is wrapped into a new tensor and cast on every call: on the
    per-channel vectors that made ``v.mul_(0.5)`` ~3 us against ~1 us for ``v.mul_(t)``.
    The cached tensors are only ever read. Under ``torch.compile`` a fresh one is traced
    (the compiler folds it; a cache would only hide a global from it).
    """
    if torch.compiler.is_compiling():
        return _new_scalar(value, dtype, device)
    return _cached_scalar(value, dtype, device)


def _new_scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((), value, dtype=dtype, device=device)


_cached_scalar = functools.lru_cache(maxsize=256)(_new_scalar)


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t * factor`` as a new tensor, with ``factor`` a cached 0-dim tensor."""
    return torch.mul(t, _scalar(factor, t.dtype, t.device))


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    """Per-channel sum over every dim but 1: (N, C, ...) -> (C,).

    A contiguous input is viewed as (N, C, L) and summed over the contiguous L first
    (0.6-0.8x the time of ``t.sum((0, 2, 3))`` on (128, 16, 8, 8)), then over N.
    """
    if t.is_contiguous():
        n, c = t.shape[:2]
        return t.view(n, c, -1).sum(2).sum(0)  # (N, C, L) -> (N, C) -> (C,)
    return t.sum(_REDUCE_DIMS[t.dim()])


def _channel_sum_sq(t: torch.Tensor) -> torch.Tensor:
    """Per-channel ``sum(t * t)`` over every dim but 1, without a full-size temporary.

    Contiguous: ``vector_norm`` over each (sample, channel) row of the (N, C, L) view
    squares inside the reduction (one read, nothing written; 0.5-0.7x ``vecdot``, which
    materializes the product), then squared and summed over N. Other layouts: ``vecdot``
    over the rows of a channels_last (N * L, C) matrix, or a product and a sum.
    """
    n, c = t.shape[:2]
    if t.is_contiguous():
        norms = torch.linalg.vector_norm(t.view(n, c, -1), dim=2)
        return norms.mul_(norms).sum(0)
    rows = t.movedim(1, -1)  # (N, *, C)
    if rows.is_contiguous():
        return torch.linalg.vecdot(rows.reshape(-1, c), rows.reshape(-1, c), dim=0)
    return torch.mul(t, t).sum(_REDUCE_DIMS[t.dim()])


def _scale_shift(invstd, weight, bias, center):
    """Per-channel ``scale = gamma * invstd`` and ``shift = beta - center * scale``, so that
    ``y = (x - center) * invstd * gamma + beta = x * scale + shift``."""
    scale = invstd if weight is None else invstd * _as(weight, invstd.dtype)
    if bias is None:
        return scale, torch.mul(center, scale).neg_()
    return scale, torch.addcmul(_as(bias, scale.dtype), center, scale, value=-1)


def _update_running(running_mean, running_var, mean_sum, var_sum, mean_div, var_div, momentum):
    """``running = (1 - momentum) * running + momentum * batch`` for both buffers in two ops,
    with batch mean ``mean_sum / mean_div`` and unbiased batch variance ``var_sum / var_div``.
    """
    dtype, device = running_mean.dtype, running_mean.device
    torch._foreach_mul_((running_mean, running_var), _scalar(1.0 - momentum, dtype, device))
    torch._foreach_addcmul_((running_mean, running_var), (mean_sum, var_sum),
                            (_scalar(momentum / mean_div, dtype, device),
                             _scalar(momentum / var_div, dtype, device)))


def _train_forward_2d(x, weight, bias, running_mean, running_var, momentum, eps):
    """Training forward for (N, C) input: y and the tensors backward needs.

    FC activations are small ((128, 120) in BN-LeNet), so time goes to per-op overhead,
    not memory: an exact two-pass mean and variance, no Python-float operands, 9 ops.
    x_hat is kept for backward (the size of x, which is not kept), so that backward
    needs only 6: ``dgamma = sum(dy * x_hat)`` is one ``vecdot``.
    """
    count = x.shape[0]
    total = torch.sum(x, 0)  # (C,)
    x_hat = torch.sub(x, total, alpha=1.0 / count)  # (N, C): x - mean for now
    sq_dev = torch.linalg.vecdot(x_hat, x_hat, dim=0)  # (C,): sum (x - mean)^2
    # invstd = 1 / sqrt(sq_dev / count + eps)
    invstd = torch.add(_scalar(eps, x.dtype, x.device), sq_dev, alpha=1.0 / count).rsqrt_()
    if running_mean is not None:
        _update_running(running_mean, running_var, total, sq_dev, count, count - 1, momentum)
    x_hat.mul_(invstd)
    weight = None if weight is None else _as(weight, x.dtype)
    if bias is None:
        y = x_hat if weight is None else torch.mul(x_hat, weight)
    elif weight is None:
        y = torch.add(x_hat, _as(bias, x.dtype))
    else:
        y = torch.addcmul(_as(bias, x.dtype), x_hat, weight)
    return y, (x_hat, invstd, weight)


def _train_backward_2d(ctx, dy, x_hat, invstd, weight):
    """dx, dgamma, dbeta for :func:`_train_forward_2d` (dy: (N, C) in the stats dtype)."""
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    count = dy.shape[0]
    sum_dy = torch.sum(dy, 0)
    dw = torch.linalg.vecdot(dy, x_hat, dim=0)  # sum(dy * x_hat)
    dx = None
    if need_dx:  # (dy - mean(dy) - x_hat * mean(dy * x_hat)) * gamma * invstd
        scale = invstd if weight is None else torch.mul(invstd, weight)
        dx = torch.sub(dy, sum_dy, alpha=1.0 / count).addcmul_(x_hat, dw, value=-1.0 / count)
        dx = _as(dx.mul_(scale), ctx.input_dtype)
    return (dx, _as(dw, ctx.weight_dtype) if need_dw else None,
            _as(sum_dy, ctx.weight_dtype) if need_db else None)


def _train_forward_nd(xs, weight, bias, running_mean, running_var, momentum, eps):
    """Training forward for (N, C, ...) input (xs in the stats dtype).

    Three passes for the statistics (x - shift_k into the output's buffer, its sum, its
    sum of squares), two to scale and shift that buffer in place into y.
    """
    ndim = xs.dim()
    shape = _CHANNEL_SHAPE[ndim]
    count = xs.numel() // xs.shape[1]
    head = xs[:_SHIFT_SAMPLES]
    shift_k = _scaled(head.sum(_REDUCE_DIMS[ndim]), head.shape[1] / head.numel())
    y = torch.sub(xs, shift_k.view(shape))  # the output's buffer; holds x - shift_k for now
    mean_k = _scaled(_channel_sum(y), 1.0 / count)  # batch mean = shift_k + mean_k
    var = _scaled(_channel_sum_sq(y), 1.0 / count).addcmul_(mean_k, mean_k, value=-1)
    invstd = torch.add(var, _scalar(eps, var.dtype, var.device)).rsqrt_()
    if running_mean is not None:
        _update_running(running_mean, running_var, torch.add(shift_k, mean_k), var, 1,
                        (count - 1) / count, momentum)
    scale, shift = _scale_shift(invstd, weight, bias, mean_k)
    y.mul_(scale.view(shape)).add_(shift.view(shape))
    return y, (invstd, scale, mean_k, shift_k)


def _train_backward_nd(ctx, dys, x, invstd, scale, mean_k, shift_k):
    """dx, dgamma, dbeta for :func:`_train_forward_nd` (dys in the stats dtype).

    ``sum(dy * (x - mean))`` is summed from the product formed in dx's buffer, which
    is then refilled with ``x - shift_k``: one pass more than keeping the product in a
    temporary, but no full-size allocation (whose page faults cost more, ~0.5 us a page).
    """
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    ndim = dys.dim()
    shape = _CHANNEL_SHAPE[ndim]
    count = dys.numel() // dys.shape[1]
    sum_dy = _channel_sum(dys)
    db = _as(sum_dy, ctx.weight_dtype) if need_db else None
    if not (need_dx or need_dw):
        return None, None, db
    xs = x.float() if x.dtype in _LOW_PRECISION else x
    kv = shift_k.view(shape)
    buf = torch.sub(xs, kv).mul_(dys)  # (N, C, ...): dx's buffer; dy * (x - shift_k)
    dot = _channel_sum(buf).addcmul_(mean_k, sum_dy, value=-1)  # sum(dy * (x - mean))
    dw = _as(dot * invstd, ctx.weight_dtype) if need_dw else None  # sum(dy * x_hat)
    dx = None
    if need_dx:
        # dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat))
        #    = (x - shift_k) * b + c + dy * scale
        minus_inv_count = _scalar(-1.0 / count, dot.dtype, dot.device)
        b = torch.mul(invstd, invstd).mul_(scale).mul_(dot).mul_(minus_inv_count)
        c = torch.mul(scale, sum_dy).mul_(minus_inv_count).addcmul_(b, mean_k, value=-1)
        dx = torch.sub(xs, kv, out=buf).mul_(b.view(shape)).add_(c.view(shape))
        dx = _as(dx.addcmul_(dys, scale.view(shape)), ctx.input_dtype)
    return dx, dw, db


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
        xs = x.float() if x.dtype in _LOW_PRECISION else x
        if training and x.dim() == 2:
            y, saved = _train_forward_2d(xs, weight, bias, running_mean, running_var,
                                         momentum, eps)
        elif training:
            y, stats = _train_forward_nd(xs, weight, bias, running_mean, running_var,
                                         momentum, eps)
            saved = (x, *stats)  # only x is full-size, as in torch's kernel
        else:
            keep_x = weight is not None and ctx.needs_input_grad[1]
            y, saved = _eval_forward(xs, weight, bias, running_mean, running_var, eps)
            saved = (x if keep_x else None, *saved)
        ctx.save_for_backward(*saved)
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


def _eval_forward(xs, weight, bias, running_mean, running_var, eps):
    """Prediction: y = x * scale + shift with the running statistics."""
    shape = _CHANNEL_SHAPE[xs.dim()]
    invstd = torch.add(_as(running_var, xs.dtype), _scalar(eps, xs.dtype, xs.device)).rsqrt_()
    # A copy: the running mean may change in place before backward runs.
    offset = _as(running_mean, xs.dtype).clone()
    scale, shift = _scale_shift(invstd, weight, bias, offset)
    y = torch.mul(xs, scale.view(shape)).add_(shift.view(shape))
    return y, (invstd, scale, offset, None)


def _eval_backward(ctx, dys, x, invstd, scale, offset):
    """dx, dgamma, dbeta of :func:`_eval_forward` (constant statistics)."""
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dims, shape = _REDUCE_DIMS[dys.dim()], _CHANNEL_SHAPE[dys.dim()]
    dx = dw = db = None
    if need_db:
        db = _as(dys.sum(dims), ctx.weight_dtype)
    if need_dw:
        xs = x.float() if x.dtype in _LOW_PRECISION else x
        dot = torch.sub(xs, offset.view(shape)).mul_(dys).sum(dims)
        dw = _as(dot.mul_(invstd), ctx.weight_dtype)
    if need_dx:
        dx = _as(dys * scale.view(shape), ctx.input_dtype)
    return dx, dw, db


def _backward(ctx, dy):
    """dx, dgamma, dbeta (and None for the other inputs) of ``FusedBatchNorm``."""
    if dy is None:
        return (None,) * 8
    saved = ctx.saved_tensors
    dys = dy.float() if dy.dtype in _LOW_PRECISION else dy
    if not ctx.training:
        grads = _eval_backward(ctx, dys, *saved[:4])
    elif dy.dim() == 2:
        grads = _train_backward_2d(ctx, dys, *saved[:3])
    else:
        grads = _train_backward_nd(ctx, dys, *saved)
    return (*grads, None, None, None, None, None)


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
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return FusedBatchNorm.apply(input, weight, bias, running_mean, running_var, training,
                                    momentum, eps)
    # What Function.apply does outside functorch transforms and torch.compile, minus its
    # generic per-argument Python: unwrap tensors left over from an exited transform,
    # then the C++ apply that records the autograd node.
    return _apply(_unwrap(input), _unwrap(weight), _unwrap(bias), running_mean, running_var,
                  training, momentum, eps)


def _unwrap(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None else _unwrap_if_dead(t)


_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
# The C++ ``apply`` under ``Function.apply`` (see the module docstring for its cost).
_apply = super(torch.autograd.Function, FusedBatchNorm).apply
