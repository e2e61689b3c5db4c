"""The fast batch norm: one ``torch.autograd.Function`` with a hand-derived backward.

Why a custom Function: letting autograd differentiate the textbook formula records every
intermediate (x - mean, its square, x_hat, x_hat * gamma, ...) and replays a backward op
for each; that is what made the chapter's scratch version several times slower than
torch's kernel. Deriving the gradient by hand keeps the input and a few per-channel
vectors, and does each direction in a handful of passes over memory with plain tensor ops
(no compiler at run time; any device torch supports).

The math, per channel, with m values per channel (every dim but dim 1),
``sigma = sqrt(var + eps)`` and ``x_hat = (x - mean) / sigma``::

    forward   y = x_hat * gamma + beta
    backward  dbeta  = sum(dy)
              dgamma = sum(dy * x_hat)
              dx     = gamma / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat))   (training)
              dx     = dy * gamma / sigma_running                                    (eval)
    tangent   dy_t   = gamma / sigma * (x_t - mean(x_t) - x_hat * mean(x_hat * x_t))
                       + x_hat * gamma_t + beta_t                                    (training)

How it is fast (each choice timed against its alternatives on the chapter's shapes,
interleaved with torch's kernel):

* Per-channel statistics are plain reductions. A contiguous (N, C, ...) tensor is viewed
  as (N, C, L) and reduced over the contiguous L first, much faster than ``var_mean``
  over (0, 2, 3). The sum of squares is ``vector_norm`` over L, squared: it squares
  inside the reduction and writes nothing, where ``vecdot`` or ``(x * x).sum()``
  materialize a full-size product.
* No full-size temporary, only the buffer each direction must return: forward writes
  ``x - shift_k`` into the output's buffer, takes the statistics from it and scales it in
  place into ``y``; backward forms ``dy * (x - shift_k)`` in dx's buffer, sums it, then
  refills the buffer with ``x - shift_k`` and turns it into dx in place. A fresh
  full-size tensor costs page faults that outweigh an extra pass over memory that is in
  cache.
* ``y = xk * scale + shift`` and ``dx = xk * b + c + dy * scale`` (per-channel ``scale =
  gamma / sigma``, ``b``, ``c``) are in-place ``mul_`` / ``add_`` / ``addcmul_`` chains
  (``addcmul`` with two per-channel broadcast operands measured slower than ``mul`` +
  ``add_``).
* Per-channel arithmetic takes no Python floats as operands (each would be wrapped into a
  new tensor and cast on every op): constants are cached 0-dim tensors (``_scalar``,
  only ever read) or ``alpha=`` / ``value=`` arguments, and both running buffers are
  updated by one ``_foreach_lerp_``.
* Small inputs (the FC layers' (128, 120)) are dominated by per-op and Python overhead,
  not memory: (N, C) input in training takes its own path (``_train_forward_2d``) with
  few ops. ``impl="cpp"`` (``bnlab.kernels.cpp``) is the answer for those shapes.

Two Functions, one math: ``FusedBatchNorm`` (``forward`` with ``ctx``) outside
``torch.func``, and ``FuncFusedBatchNorm`` under it. torch.func needs ``setup_context`` (a
``forward`` without ``ctx``), and with it ``Function.apply`` binds each call's arguments
to the signature of ``forward`` and the statistics that backward needs must leave
forward as extra, non-differentiable outputs (``setup_context`` cannot see the forward's
locals): bookkeeping that made the small FC shapes markedly slower. So
``fused_batch_norm`` calls the eager one; a torch.func transform refuses it before its
forward runs, and the call goes to ``FuncFusedBatchNorm``: ``vmap`` through
``generate_vmap_rule``, ``grad``/``jacrev`` through ``backward``, ``jvp``/``jacfwd``
through ``jvp`` (forward-mode AD). Both enter through the public ``Function.apply``.

Double backward: when a graph of the gradient is being built (``create_graph=True``,
gradient penalties, ``torch.func.grad`` of a gradient), the in-place backward above
would not be differentiable, so backward switches to the same formulas written as plain
differentiable ops on the saved input (``_differentiable_backward``); autograd then
differentiates those, to any order.

Numerics (shifted data): the statistics are sums of ``xk = x - shift_k``, where
``shift_k`` is the per-channel mean of the first few samples of the batch, so ``xk`` is of
the size of the standard deviation, not of the mean. Then ``mean = shift_k + mean(xk)`` and
``var = mean(xk^2) - mean(xk)^2`` lose almost nothing: data with mean 1e4 and std 1 in
float32 is normalized about as exactly as float64 would, where the naive
``E[x^2] - E[x]^2`` loses every digit. Backward works on ``x - shift_k`` too, so dx is as
exact. (N, C) input uses an exact two-pass mean and variance instead. float16/bfloat16
inputs are computed in float32 and rounded once at the end (statistics and parameters in
float32, as torch).

An empty batch (no values per channel) normalizes to an empty output and leaves the
running statistics alone, as torch does.
"""

from __future__ import annotations

import functools

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_SHIFT_SAMPLES = 8  # samples whose mean shifts the data before the statistics are summed


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the statistics are computed in: float32 for half/bfloat16 inputs (as torch)."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def reduce_dims(ndim: int) -> tuple[int, ...]:
    """Every dim but the channel dim 1 (any rank >= 2)."""
    return (0, *range(2, ndim))


def channel_shape(ndim: int) -> tuple[int, ...]:
    """The view that broadcasts a (C,) vector against (N, C, ...) input of rank ``ndim``."""
    return (-1,) + (1,) * (ndim - 2)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``value`` as a cached 0-dim tensor, an operand torch uses as it is.

    A Python float operand is wrapped into a new tensor and cast on every call, which is
    a large part of an op's time on the per-channel vectors. The cached tensors are
    private to this module and only ever read (every use is an operand of an
    out-of-place op or the non-``self`` operand of an in-place one), never returned or
    saved for backward. They are made outside inference mode so that a first call under
    ``torch.inference_mode()`` does not cache an inference tensor. Under
    ``torch.compile`` a fresh one is traced (the compiler folds it; a cache would only
    hide a global from it).
    """
    if torch.compiler.is_compiling():
        return _new_scalar(value, dtype, device)
    return _cached_scalar(value, dtype, device)


def _new_scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((), value, dtype=dtype, device=device)


@functools.lru_cache(maxsize=256)
def _cached_scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return _new_scalar(value, dtype, device)


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t * factor`` as a new tensor, with ``factor`` a cached 0-dim tensor."""
    return torch.mul(t, _scalar(factor, t.dtype, t.device))


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    """Per-channel sum over every dim but 1: (N, C, ...) -> (C,).

    A contiguous input is viewed as (N, C, L) and summed over the contiguous L first
    (faster than ``t.sum((0, 2, 3))``), then over N.
    """
    if t.is_contiguous():
        n, c = t.shape[:2]
        return t.view(n, c, -1).sum(2).sum(0)  # (N, C, L) -> (N, C) -> (C,)
    return t.sum(reduce_dims(t.dim()))


def _channel_sum_sq(t: torch.Tensor) -> torch.Tensor:
    """Per-channel ``sum(t * t)`` over every dim but 1, without a full-size temporary.

    Contiguous: ``vector_norm`` over each (sample, channel) row of the (N, C, L) view
    squares inside the reduction (one read, nothing written; faster than ``vecdot``, which
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
    return torch.mul(t, t).sum(reduce_dims(t.dim()))


def _scale_shift(invstd, weight, bias, center):
    """Per-channel ``scale = gamma * invstd`` and ``shift = beta - center * scale``, so that
    ``y = (x - center) * invstd * gamma + beta = x * scale + shift``."""
    scale = _scale(invstd, weight)
    if bias is None:
        return scale, torch.mul(center, scale).neg_()
    return scale, torch.addcmul(_as(bias, scale.dtype), center, scale, value=-1)


def _scale(invstd, weight):
    """Per-channel ``gamma * invstd`` (``invstd`` itself without affine weight)."""
    return invstd if weight is None else invstd * _as(weight, invstd.dtype)


def _update_running(running_mean, running_var, batch_mean, batch_var, momentum):
    """``running = (1 - momentum) * running + momentum * batch`` for both buffers in one op
    (``batch_var`` unbiased). float16/bfloat16 buffers with float32 statistics: computed in
    float32, then stored (as torch does)."""
    if running_mean.dtype != batch_mean.dtype:
        for running, batch in ((running_mean, batch_mean), (running_var, batch_var)):
            running.copy_(torch.lerp(running.to(batch.dtype), batch, momentum))
        return
    if torch.compiler.is_compiling():  # a traced momentum may be symbolic: as a tensor
        momentum = _scalar(momentum, running_mean.dtype, running_mean.device)
    try:
        torch._foreach_lerp_((running_mean, running_var), (batch_mean, batch_var), momentum)
    except RuntimeError:  # under torch.func.vmap: _foreach ops have no batching rule
        _update_running_each(running_mean, running_var, batch_mean, batch_var, momentum)


def _update_running_each(running_mean, running_var, batch_mean, batch_var, momentum):
    """The same update one buffer at a time (what vmap can batch)."""
    try:
        running_mean.lerp_(batch_mean, momentum)
        running_var.lerp_(batch_var, momentum)
    except RuntimeError as err:
        raise RuntimeError(
            "batch norm got a batched input under torch.func.vmap but running_mean and "
            "running_var, which training updates in place, are not batched: batch them like "
            "the input (torch.func.stack_module_state), do not track them "
            "(track_running_stats=False, bnlab.nn.replace_all_batch_norm_modules_), or use "
            f"eval mode ({err})") from err


def _train_forward_2d(x, weight, bias, running_mean, running_var, momentum, eps):
    """Training forward for (N, C) input: y, x_hat and invstd.

    FC activations are small ((128, 120) in BN-LeNet), so time goes to per-op overhead,
    not memory: an exact two-pass mean and variance, no Python-float operands, few ops.
    x_hat is kept for backward, so that ``dgamma = sum(dy * x_hat)`` is one ``vecdot``.
    """
    count = x.shape[0]
    mean = torch.mean(x, 0)  # (C,)
    x_hat = torch.sub(x, mean)  # (N, C): x - mean for now
    sq_dev = torch.linalg.vecdot(x_hat, x_hat, dim=0)  # (C,): sum (x - mean)^2
    # invstd = 1 / sqrt(sq_dev / count + eps)
    invstd = torch.add(_scalar(eps, x.dtype, x.device), sq_dev, alpha=1.0 / count).rsqrt_()
    if running_mean is not None:
        _update_running(running_mean, running_var, mean, _scaled(sq_dev, 1.0 / (count - 1)),
                        momentum)
    x_hat.mul_(invstd)
    weight = None if weight is None else _as(weight, x.dtype)
    if bias is None:
        y = x_hat.clone() if weight is None else torch.mul(x_hat, weight)
    elif weight is None:
        y = torch.add(x_hat, _as(bias, x.dtype))
    else:
        y = torch.addcmul(_as(bias, x.dtype), x_hat, weight)
    return y, (x_hat, invstd)


def _train_backward_2d(ctx, dy, weight, x_hat, invstd):
    """dx, dgamma, dbeta for :func:`_train_forward_2d` (dy: (N, C) in the stats dtype)."""
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    count = dy.shape[0]
    sum_dy = torch.sum(dy, 0)
    dw = torch.linalg.vecdot(dy, x_hat, dim=0)  # sum(dy * x_hat)
    dx = None
    if need_dx:  # (dy - mean(dy) - x_hat * mean(dy * x_hat)) * gamma * invstd
        scale = _scale(invstd, weight)
        dx = torch.sub(dy, sum_dy, alpha=1.0 / count).addcmul_(x_hat, dw, value=-1.0 / count)
        dx = _as(dx.mul_(scale), ctx.input_dtype)
    return (dx, _as(dw, ctx.weight_dtype) if need_dw else None,
            _as(sum_dy, ctx.weight_dtype) if need_db else None)


def _train_forward_nd(xs, weight, bias, running_mean, running_var, momentum, eps,
                      in_place=True):
    """Training forward for (N, C, ...) input (xs in the stats dtype): y, invstd, mean_k
    and shift_k (batch mean = shift_k + mean_k).

    Three passes for the statistics (x - shift_k into the output's buffer, its sum, its
    sum of squares), two to scale and shift that buffer in place into y (out of place
    with ``in_place=False``: under vmap the parameters may be batched where x is not).
    """
    ndim = xs.dim()
    shape = channel_shape(ndim)
    count = xs.numel() // xs.shape[1]
    head = xs[:_SHIFT_SAMPLES]
    shift_k = _scaled(head.sum(reduce_dims(ndim)), head.shape[1] / head.numel())
    y = torch.sub(xs, shift_k.view(shape))  # the output's buffer; holds x - shift_k for now
    mean_k = _scaled(_channel_sum(y), 1.0 / count)  # batch mean = shift_k + mean_k
    var = _scaled(_channel_sum_sq(y), 1.0 / count).addcmul_(mean_k, mean_k, value=-1)
    invstd = torch.add(var, _scalar(eps, var.dtype, var.device)).rsqrt_()
    if running_mean is not None:
        _update_running(running_mean, running_var, torch.add(shift_k, mean_k),
                        _scaled(var, count / (count - 1)), momentum)
    scale, shift = _scale_shift(invstd, weight, bias, mean_k)
    y = y.mul_(scale.view(shape)) if in_place else torch.mul(y, scale.view(shape))
    return y.add_(shift.view(shape)), (invstd, mean_k, shift_k)


def _train_backward_nd(ctx, dys, x, weight, invstd, mean_k, shift_k):
    """dx, dgamma, dbeta for :func:`_train_forward_nd` (dys in the stats dtype).

    ``sum(dy * (x - mean))`` is summed from the product formed in dx's buffer, which
    is then refilled with ``x - shift_k``: one pass more than keeping the product in a
    temporary, but no full-size allocation (whose page faults cost more).
    """
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    shape = channel_shape(dys.dim())
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
        scale = _scale(invstd, weight)
        minus_inv_count = _scalar(-1.0 / count, dot.dtype, dot.device)
        b = torch.mul(invstd, invstd).mul_(scale).mul_(dot).mul_(minus_inv_count)
        c = torch.mul(scale, sum_dy).mul_(minus_inv_count).addcmul_(b, mean_k, value=-1)
        dx = torch.sub(xs, kv, out=buf).mul_(b.view(shape)).add_(c.view(shape))
        dx = _as(dx.addcmul_(dys, scale.view(shape)), ctx.input_dtype)
    return dx, dw, db


def _eval_forward(xs, weight, bias, running_mean, running_var, eps, in_place=True):
    """Prediction: y = x * scale + shift with the running statistics; y, invstd, offset."""
    shape = channel_shape(xs.dim())
    invstd = torch.add(_as(running_var, xs.dtype), _scalar(eps, xs.dtype, xs.device)).rsqrt_()
    # A copy: the running mean may change in place before backward runs.
    offset = _as(running_mean, xs.dtype).clone()
    scale, shift = _scale_shift(invstd, weight, bias, offset)
    y = torch.mul(xs, scale.view(shape))
    y = y.add_(shift.view(shape)) if in_place else torch.add(y, shift.view(shape))
    return y, (invstd, offset)


def _eval_backward(ctx, dys, x, weight, invstd, offset):
    """dx, dgamma, dbeta of :func:`_eval_forward` (constant statistics)."""
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dims, shape = reduce_dims(dys.dim()), channel_shape(dys.dim())
    dx = dw = db = None
    if need_db:
        db = _as(dys.sum(dims), ctx.weight_dtype)
    if need_dw:
        xs = x.float() if x.dtype in _LOW_PRECISION else x
        dot = torch.sub(xs, offset.view(shape)).mul_(dys).sum(dims)
        dw = _as(dot.mul_(invstd), ctx.weight_dtype)
    if need_dx:
        dx = _as(dys * _scale(invstd, weight).view(shape), ctx.input_dtype)
    return dx, dw, db


def _normalized(ctx, xs, stats):
    """x_hat and invstd (broadcastable against xs) as differentiable functions of xs.

    Training: the batch statistics recomputed from xs (so that a second derivative sees
    how they depend on x). Eval: the running statistics, constants saved by forward.
    """
    dims, shape = reduce_dims(xs.dim()), channel_shape(xs.dim())
    if ctx.training:
        var, mean = torch.var_mean(xs, dims, correction=0, keepdim=True)
        invstd = torch.rsqrt(var + ctx.eps)
    else:
        invstd, offset = stats
        invstd, mean = invstd.view(shape), offset.view(shape)
    return (xs - mean) * invstd, invstd


def _differentiable_backward(ctx, dy):
    """dx, dgamma, dbeta by the formulas of the module docstring in differentiable ops.

    Used while autograd records a graph of the gradient (double backward): no in-place
    op, no saved intermediate the input's graph cannot reach.
    """
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    x, weight, *stats = ctx.saved_tensors
    xs = x.float() if x.dtype in _LOW_PRECISION else x
    dys = dy.float() if dy.dtype in _LOW_PRECISION else dy
    dims, shape = reduce_dims(xs.dim()), channel_shape(xs.dim())
    x_hat, invstd = _normalized(ctx, xs, stats)
    dx = dw = db = None
    if need_db:
        db = dys.sum(dims).to(ctx.weight_dtype)
    if need_dw:
        dw = (dys * x_hat).sum(dims).to(ctx.weight_dtype)
    if need_dx:
        g = dys if weight is None else dys * weight.to(xs.dtype).view(shape)
        if ctx.training:
            g = (g - g.mean(dims, keepdim=True)
                 - x_hat * (g * x_hat).mean(dims, keepdim=True))
        dx = (g * invstd).to(ctx.input_dtype)
    return dx, dw, db


def _forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
             in_place=True):
    """y and the per-channel statistics backward needs (see each path).

    Batch norm is not an autocast op (torch's keeps its input's dtype): under autocast
    the arithmetic here runs with autocast off, else ``vecdot`` and friends would be
    cast to half precision.
    """
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return _forward(x, weight, bias, running_mean, running_var, training, momentum,
                            eps, in_place)
    xs = x.float() if x.dtype in _LOW_PRECISION else x
    if training and x.dim() == 2:
        y, stats = _train_forward_2d(xs, weight, bias, running_mean, running_var, momentum,
                                     eps)
    elif training:
        y, stats = _train_forward_nd(xs, weight, bias, running_mean, running_var, momentum,
                                     eps, in_place)
    else:
        y, stats = _eval_forward(xs, weight, bias, running_mean, running_var, eps, in_place)
    return _as(y, x.dtype), stats


def _save(ctx, x, weight, training, eps, stats, forward_mode=True):
    """What backward and jvp read. x and weight are inputs: saving them keeps a reference."""
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, *stats)
    if forward_mode:
        ctx.save_for_forward(x, weight, *stats)
    ctx.training = training
    ctx.eps = eps
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.input_dtype = x.dtype


def _gradients(ctx, dy, in_place=True):
    """The 8 gradients of ``apply``'s inputs (only x, weight and bias have any)."""
    if dy is None:
        return (None,) * 8
    if torch.is_grad_enabled() or not in_place:  # a graph of the gradient is wanted
        grads = _differentiable_backward(ctx, dy)
    else:
        grads = _backward(ctx, dy)
    return (*grads, None, None, None, None, None)


def _tangent(ctx, x_t, weight_t, bias_t):
    """Forward mode: the tangent of y for tangents of x, weight and bias (None: zero)."""
    x, weight, *stats = ctx.saved_tensors
    xs = x.float() if x.dtype in _LOW_PRECISION else x
    dims, shape = reduce_dims(xs.dim()), channel_shape(xs.dim())
    x_hat, invstd = _normalized(ctx, xs, stats)
    y_t = torch.zeros_like(xs)
    if x_t is not None:
        d = x_t.float() if x_t.dtype in _LOW_PRECISION else x_t
        if ctx.training:
            d = d - d.mean(dims, keepdim=True) - x_hat * (x_hat * d).mean(dims, keepdim=True)
        d = d * invstd
        y_t = y_t + (d if weight is None else d * weight.to(xs.dtype).view(shape))
    if weight_t is not None:
        y_t = y_t + x_hat * weight_t.to(xs.dtype).view(shape)
    if bias_t is not None:
        y_t = y_t + bias_t.to(xs.dtype).view(shape)
    return y_t.to(x.dtype)


class FuncFusedBatchNorm(torch.autograd.Function):
    """Batch norm with an analytic backward and forward-mode derivative, for torch.func.

    Under vmap some of x, the parameters and the statistics may be batched and others
    not, and an in-place op cannot write a batched result into an unbatched tensor: the
    full-size arithmetic here is out of place, and backward is the differentiable one.

    ``apply(x, weight, bias, running_mean, running_var, training, momentum, eps)`` returns
    ``(y, *stats)``: the per-channel statistics are non-differentiable outputs that
    backward reads (``setup_context`` cannot see the forward's locals). In training the
    batch statistics normalize and, if given, the running statistics are updated in place
    (variance unbiased); otherwise the running statistics normalize. Arguments are not
    checked here: ``bnlab.functional`` does that.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, training, momentum, eps):
        y, stats = _forward(x, weight, bias, running_mean, running_var, training, momentum,
                            eps, in_place=False)
        return y, *stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, _, _, training, _, eps = inputs
        ctx.mark_non_differentiable(*output[1:])
        _save(ctx, x, weight, training, eps, output[1:])

    @staticmethod
    def backward(ctx, dy, *_stats_grads):
        return _gradients(ctx, dy, in_place=False)

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, *_):
        return _tangent(ctx, x_t, weight_t, bias_t), *(None for _ in ctx.saved_tensors[2:])


class FusedBatchNorm(torch.autograd.Function):
    """The same Function in the older form (``forward`` with ``ctx``), outside torch.func.

    ``Function.apply`` binds every call's arguments to the signature of ``forward`` when
    ``setup_context`` is defined, and extra outputs each cost autograd bookkeeping: on
    the small FC shapes that made the fast path markedly slower. This form returns y
    alone and saves the statistics directly. torch.func refuses it (before its forward
    runs), and ``fused_batch_norm`` then calls ``FuncFusedBatchNorm``. No ``jvp`` here:
    ``torch.compile`` cannot trace a Function with a custom one.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        y, stats = _forward(x, weight, bias, running_mean, running_var, training, momentum,
                            eps)
        _save(ctx, x, weight, training, eps, stats, forward_mode=False)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _gradients(ctx, dy)


def _backward(ctx, dy):
    """dx, dgamma, dbeta of ``FusedBatchNorm`` with the in-place fast paths."""
    x, weight, *stats = ctx.saved_tensors
    dys = dy.float() if dy.dtype in _LOW_PRECISION else dy
    if not ctx.training:
        return _eval_backward(ctx, dys, x, weight, *stats)
    if dy.dim() == 2:
        return _train_backward_2d(ctx, dys, weight, *stats)
    return _train_backward_nd(ctx, dys, x, weight, *stats)


def _empty_batch_norm(x, weight, bias):
    """An input with no values per channel: an empty output, zero parameter gradients
    (sums over nothing), the statistics untouched (there is nothing to average)."""
    shape = channel_shape(x.dim())
    y = x.to(stat_dtype(x.dtype))
    if weight is not None:
        y = y * weight.to(y.dtype).view(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).view(shape)
    return y.to(x.dtype)


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
    if input.numel() == 0:
        return _empty_batch_norm(input, weight, bias)
    if running_mean is None or running_var is None:
        running_mean = running_var = None
    args = (input, weight, bias, running_mean, running_var, training, momentum, eps)
    if torch.compiler.is_compiling():  # traced: nothing to fall back from
        return FusedBatchNorm.apply(*args)
    try:
        return FusedBatchNorm.apply(*args)
    except RuntimeError as err:  # under a torch.func transform, raised before forward ran
        if "setup_context" not in str(err):
            raise
    return FuncFusedBatchNorm.apply(*args)[0]
