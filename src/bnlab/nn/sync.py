"""Batch norm whose statistics span every process of a ``torch.distributed`` group.

Why: in data-parallel training each process sees only its slice of the global batch, so
a plain batch norm normalizes with the statistics of that slice (DDP's default: "local
BN", equivalent to ghost batch norm with the per-process batch as the ghost size).
``SyncBatchNorm`` normalizes every slice with the statistics of the whole global batch,
so N processes with batch B compute what one process with batch N * B would. torch's own
``SyncBatchNorm`` refuses CPU tensors; this one runs on ``torch.distributed`` with any
backend (gloo on CPU, nccl on CUDA), with no transport of its own.

The math, per channel, with rank r holding n_r values (n_r may differ between ranks, and
may be 0), ``n = sum_r n_r``::

    forward   one all-reduce of each rank's (n_r, k_r, m_r, M2_r):
                k_r = mean of its first samples (a shift), m_r = mean(x - k_r),
                M2_r = sum (x - k_r - m_r)^2
              center = k of the first rank with data; o_r = k_r - center + m_r
              offset = sum_r n_r o_r / n                          (mean = center + offset)
              M2     = sum_r M2_r + sum_r n_r (o_r - offset)^2    (Chan et al.'s merge)
              x_hat  = (x - center - offset) / sqrt(M2 / n + eps),  y = gamma x_hat + beta
    backward  one all-reduce of (sum dy, sum dy * x_hat) over the global batch
              dx     = gamma / sigma * (dy - sum(dy) / n - x_hat * sum(dy * x_hat) / n)
              dgamma = sum(dy * x_hat),  dbeta = sum(dy)     (this rank's sums only)

Why this and not summed (count, sum, sum of squares): ``E[x^2] - E[x]^2`` loses every
digit when the mean is large against the spread (float32 data with mean 1e4 and std 1),
and a shift only helps when every rank subtracts the same one, which no rank knows before
communicating. So each rank shifts by its own ``k_r`` (as the fast path does) and sends
its shifted mean and M2; ranks' means are compared relative to one common ``center``,
and every difference taken is between close numbers. To do that in ONE all-reduce, each
rank writes its four numbers per channel into its own slot of a (world, 4, C) buffer of
zeros: the sum is every rank's values (adding zeros is exact). The merge then runs on
every rank on the same numbers in the same order, so all ranks get bit-identical
statistics and running averages. The buffer is 4 * world * C numbers: tiny for batch
norm's channel counts.

Parameter gradients are this rank's sums: DDP (or the caller) reduces them across
ranks, as it does every other parameter's. The running variance is unbiased with the
global count, ``M2 / (n - 1)``.

Conventions the module keeps from ``bnlab.nn.BatchNorm*``: mode follows
``self.training``; eval mode (or no initialized process group, or a group of one
process) computes exactly ``bnlab.nn.BatchNorm*`` and communicates nothing. Every rank
of the group must call the layer in training the same number of times, and backward
through it too (as with any collective); a rank with an empty batch still calls it.
Backward communicates only when the input needs a gradient, which is the same on every
rank of one model. The forward reads the global count on the host (one device sync on
CUDA) to refuse a global batch of one value per channel on every rank alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from bnlab.functional import DEFAULT_IMPL, Impl
from bnlab.kernels.fused import stat_dtype
from bnlab.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    _BatchNorm,
    is_batch_norm,
    take_state,
)
from bnlab.nn.batchnorm_act import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    LazyBatchNormAct1d,
    LazyBatchNormAct2d,
    LazyBatchNormAct3d,
    unfuse_batch_norm_act,
)

__all__ = ["SyncBatchNorm", "check_convertible", "sync_batch_norm"]


def _channel_shape(ndim: int) -> tuple[int, ...]:
    return (-1,) + (1,) * (ndim - 2)


def _reduce_dims(ndim: int) -> tuple[int, ...]:
    return (0, *range(2, ndim))


_SHIFT_SAMPLES = 8  # samples whose mean is a rank's shift, as in the fast path


def local_statistics(xs: torch.Tensor) -> torch.Tensor:
    """This rank's (count, shift, mean of x - shift, M2) per channel: (4, C).

    ``shift`` is the mean of the first few samples, so ``x - shift`` is of the size of the
    spread, not of the mean, and is formed almost exactly. An empty batch gives zeros.
    """
    channels, dims = xs.shape[1], _reduce_dims(xs.dim())
    stats = torch.zeros(4, channels, dtype=xs.dtype, device=xs.device)
    count = xs.numel() // channels if channels else 0
    if count:
        head = xs[:_SHIFT_SAMPLES]
        shift = head.mean(dims)
        var, mean = torch.var_mean(xs - shift.view(_channel_shape(xs.dim())), dims,
                                   correction=0)
        stats[0], stats[1], stats[2], stats[3] = count, shift, mean, var * count
    return stats


def merge_statistics(gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global (center, offset, M2) per channel from each rank's :func:`local_statistics`.

    ``gathered``: (world, 4, C). The global mean is ``center + offset``, with ``center``
    the shift of the first rank that has data (the same number on every rank), so the
    input is normalized as ``(x - center) - offset``, both differences of close numbers.
    Chan's merge: ``M2 = sum_r M2_r + sum_r n_r (o_r - offset)^2`` with ``o_r = shift_r
    - center + mean_r``, rank r's mean relative to ``center``. Returns three (C,) tensors.
    """
    counts, shifts, means, m2s = gathered.unbind(1)  # each (world, C)
    first = torch.argmax((counts[:, 0] > 0).to(torch.int8))  # first rank with data
    center = shifts[first]  # (C,)
    offsets = shifts - center + means  # (world, C)
    count = counts.sum(0)
    offset = (counts * offsets).sum(0) / count
    m2 = m2s.sum(0) + (counts * (offsets - offset).square()).sum(0)
    return center, offset, m2


class _SyncBatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm over the global batch of ``group``; see the module docstring.

    ``apply(x, weight, bias, running_mean, running_var, momentum, eps, group)``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, group):
        dtype = stat_dtype(x.dtype)
        xs = x.to(dtype)
        gathered = torch.zeros(dist.get_world_size(group), 4, x.shape[1], dtype=dtype,
                               device=x.device)
        gathered[dist.get_rank(group)] = local_statistics(xs)  # this rank's slot
        dist.all_reduce(gathered, group=group)  # every rank's (count, shift, mean, M2)
        total = int(gathered[:, 0, 0].sum().item())
        if total <= 1:
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"{total} over the process group (this rank: input size {x.shape})")
        center, offset, m2 = merge_statistics(gathered)  # (C,) each
        invstd = torch.rsqrt(m2 / total + eps)
        shape = _channel_shape(x.dim())
        x_hat = (xs - center.view(shape) - offset.view(shape)) * invstd.view(shape)
        y = x_hat
        if weight is not None:
            y = y * weight.to(dtype).view(shape)
        if bias is not None:
            y = y + bias.to(dtype).view(shape)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_((center + offset).to(running_mean.dtype),
                                                     alpha=momentum)
                running_var.mul_(1 - momentum).add_((m2 / (total - 1)).to(running_var.dtype),
                                                    alpha=momentum)
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.group, ctx.total = group, total
        ctx.input_dtype = x.dtype
        ctx.param_dtype = next((p.dtype for p in (weight, bias) if p is not None), None)
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x_hat, invstd, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        shape, dims = _channel_shape(dy.dim()), _reduce_dims(dy.dim())
        dys = dy.to(x_hat.dtype)
        local = torch.stack([dys.sum(dims), (dys * x_hat).sum(dims)])  # (2, C)
        dw = local[1].to(ctx.param_dtype) if need_dw else None
        db = local[0].to(ctx.param_dtype) if need_db else None
        dx = None
        if need_dx:  # every rank of the group needs dx or none does: the same model
            global_sums = local.clone()
            dist.all_reduce(global_sums, group=ctx.group)
            sum_dy, sum_dy_xhat = (s.view(shape) / ctx.total for s in global_sums)
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            dx = ((dys - sum_dy - x_hat * sum_dy_xhat) * scale.view(shape)).to(ctx.input_dtype)
        return dx, dw, db, None, None, None, None, None


def sync_batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None,
                    running_var: torch.Tensor | None, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, momentum: float, eps: float,
                    group: Any = None) -> torch.Tensor:
    """Training-mode batch norm of ``input`` (N, C, ...) with statistics over ``group``.

    Every rank of ``group`` (default: the whole world) calls it with its slice of the
    global batch (N may differ between ranks, or be 0); the running statistics, when
    given, are updated in place identically on every rank. Collective: see the module
    docstring for the one all-reduce each direction costs.
    """
    group = dist.group.WORLD if group is None else group
    return _SyncBatchNormTrain.apply(input, weight, bias, running_mean, running_var,
                                     momentum, eps, group)


def _check_member(group: Any) -> None:
    """Raise if this process is not in ``group``."""
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"SyncBatchNorm: this process (global rank {dist.get_rank()}) is not a member of "
            "its process_group; every process that runs the layer must be in the group it "
            "synchronizes over (pass that process its own group)")


class SyncBatchNorm(_BatchNorm):
    """Batch norm over the global batch of a process group; drop-in for torch's.

    ``SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None, device=None, dtype=None)`` as
    ``torch.nn.SyncBatchNorm`` (plus bnlab's keyword-only ``bias`` and ``impl``, which
    picks the implementation of the non-synchronized paths). Input (N, C, ...) of any
    rank >= 2. ``process_group=None`` is the default (world) group at call time. See the
    module docstring for the math and when it communicates.
    """

    _ranks = tuple(range(2, 9))

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Any = None, device: Any = None, dtype: Any = None, *,
                 bias: bool = True, impl: Impl = DEFAULT_IMPL) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device, dtype, bias=bias, impl=impl)
        if process_group is not None and dist.is_available() and dist.is_initialized():
            _check_member(process_group)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def _sync_group(self) -> Any:
        """The group to synchronize over now, or None when there is nothing to sync with."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD if self.process_group is None else self.process_group
        _check_member(group)
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self._sync_group() if self.training else None
        if group is None:  # eval, or alone: exactly bnlab's BatchNorm, no communication
            return super().forward(input)
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise RuntimeError(
                f"expected {self.num_features} channels (dim 1) (got {input.shape[1]})")
        if not input.is_floating_point():
            raise TypeError(f"expected a floating-point input (got {input.dtype})")
        tracking = self.track_running_stats and self.running_mean is not None
        factor = 0.0 if self.momentum is None else self.momentum
        if tracking and self.momentum is None:  # cumulative moving average
            factor = 1.0 / float(self.num_batches_tracked + 1)
        y = sync_batch_norm(input, self.running_mean if tracking else None,
                            self.running_var if tracking else None, self.weight, self.bias,
                            factor, self.eps, group)
        if tracking:  # after the call: a batch that raised has not been counted
            self.num_batches_tracked.add_(1)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replace every plain BatchNorm1d/2d/3d (bnlab's or torch's, their lazy forms, and
        torch's SyncBatchNorm) in ``module`` by ``SyncBatchNorm``; return the (possibly new) root.

        As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: works in place on children;
        keeps the very same weight and bias Parameters and running-statistics buffers (so
        optimizers and state_dicts carry over), device, dtype and train/eval mode. bnlab
        modules keep their ``impl``. Unlike torch's, a batch norm with math of its own (ghost,
        renorm, noisy, or any other subclass) is not silently made plain batch norm: it has
        no synchronized form, so ``ValueError`` names it, as it does an uninitialized lazy
        batch norm; both are checked before anything is converted. A ``BatchNormAct`` is
        split into batch norm and activation (``bnlab.nn.unfuse_batch_norm_act``), and its
        batch norm converted.
        """
        check_convertible(module)
        return cls._convert(unfuse_batch_norm_act(module), process_group)

    @classmethod
    def _convert(cls, module: nn.Module, process_group: Any) -> nn.Module:
        converted = _to_sync(module, process_group) if _convertible(module) else module
        for name, child in module.named_children():
            new_child = cls._convert(child, process_group)
            if new_child is not child:
                converted.add_module(name, new_child)
        return converted


PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                     nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d, BatchNorm1d,
                     BatchNorm2d, BatchNorm3d, LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d)
"""The batch norms whose training math is SyncBatchNorm's on one process (exact types:
a subclass may change it)."""
FUSED_BATCH_NORMS = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, LazyBatchNormAct1d,
                     LazyBatchNormAct2d, LazyBatchNormAct3d)
"""Plain batch norm fused with its activation: split before converting, so convertible."""


def check_convertible(module: nn.Module) -> None:
    """``ValueError`` naming the first batch norm in ``module`` that ``convert_sync_batchnorm``
    cannot turn into ``SyncBatchNorm``: one of other math than plain batch norm, or an
    uninitialized lazy one."""
    for name, m in module.named_modules():
        where = f"{name!r} " if name else ""
        if is_batch_norm(m) and type(m) not in (*PLAIN_BATCH_NORMS, *FUSED_BATCH_NORMS,
                                                SyncBatchNorm):
            raise ValueError(f"layer {where}is a {type(m).__name__}, which has no synchronized "
                             "form: SyncBatchNorm would silently compute plain batch norm "
                             "instead")
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(f"cannot convert the uninitialized {type(m).__name__} {where}"
                             "to SyncBatchNorm: run one batch through the model first")


def _convertible(module: nn.Module) -> bool:
    return type(module) in PLAIN_BATCH_NORMS


def _to_sync(bn: nn.Module, process_group: Any) -> SyncBatchNorm:
    ref = bn.weight if bn.weight is not None else bn.running_mean
    new = SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                        process_group, device=None if ref is None else ref.device,
                        dtype=None if ref is None else ref.dtype, bias=bn.bias is not None,
                        impl=getattr(bn, "impl", DEFAULT_IMPL))
    return take_state(bn, new)
