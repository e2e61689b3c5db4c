"""Batch-norm modules: drop-ins for ``torch.nn.BatchNorm1d/2d/3d`` and their lazy forms.

Why bnlab has its own modules rather than subclasses of torch's: the point of the lab is
that the batch norm is ours, end to end, and still indistinguishable from torch's to
the code around it: same constructor (including torch 2.13's keyword-only ``bias``), same
parameter and buffer names, state_dicts that load both ways, same ``repr``.
``convert_batchnorm`` swaps torch's for ours in an existing model.

What a layer computes (the formula, the running-statistics update, torch's momentum
convention against Keras's and Flax's, the unbiased running variance) is stated once, in
``bnlab.functional``. A module adds only the choices around it:

* Training (``module.train()``): the batch statistics normalize, and the running statistics
  are updated with factor ``momentum``; ``momentum=None`` gives a cumulative moving average
  (factor ``1 / num_batches_tracked``: the plain mean of all batches seen).
* Prediction (``module.eval()``): the running statistics normalize, unless
  ``track_running_stats=False``, in which case there are none and the batch statistics
  are used in both modes.

The mode follows ``module.training`` only, never ``torch.is_grad_enabled()``. The
chapter's scratch version picks batch statistics when grad mode is on; that is wrong as
soon as the two differ: a gradient w.r.t. the input of a model in eval mode (saliency
maps, FGSM-style attacks) would normalize with the batch's statistics and overwrite
the running averages, and a training-mode pass under ``torch.no_grad()`` (e.g.
re-estimating BN statistics after pruning or weight averaging) would use the stale
running statistics and never update them.

``impl`` (keyword-only, default ``"auto"``) picks one of ``bnlab.functional``'s
``IMPLEMENTATIONS`` (see there for what each is and needs); ``"auto"`` is bnlab's C++
kernel where it applies and is built, the fast path elsewhere. Edge cases (empty batch,
eps, dtypes, transforms) behave as torch's: docs/edge-cases.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from bnlab.functional import (
    DEFAULT_IMPL,
    IMPLEMENTATIONS,
    Impl,
    check_arguments,
    check_input,
    get_implementation,
)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "convert_batchnorm",
    "is_batch_norm",
    "replace_all_batch_norm_modules_",
]


class _BatchNorm(nn.Module):
    """Shared body of BatchNorm1d/2d/3d; subclasses only say which input ranks are valid."""

    _version = 2  # state_dict layout version, as torch's (2 = has num_batches_tracked)
    _ranks: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        impl: Impl = DEFAULT_IMPL,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        get_implementation(impl)  # an unknown name fails here, not at the first forward
        self.impl = impl
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long,
                             **{k: v for k, v in factory.items() if k != "dtype"}))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches seen."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running statistics reset; weight 1 and bias 0 (the identity transform)."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}")

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in self._ranks:
            wanted = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"expected {wanted} input (got {x.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Every check first: a bad batch must not touch num_batches_tracked or the stats.
        # Batch statistics in training, and in eval when there are no running ones.
        use_batch_stats = self.training or (self.running_mean is None
                                            and self.running_var is None)
        # In training without tracking, the (absent) buffers are not updated.
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        self._check_input_dim(input)
        check_input(input, self.num_features, use_batch_stats)
        check_arguments(input, running_mean, running_var, self.weight, self.bias,
                        use_batch_stats, self.eps)

        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        return self._normalize(input, running_mean, running_var, use_batch_stats, factor)

    def _normalize(self, input: torch.Tensor, running_mean: torch.Tensor | None,
                   running_var: torch.Tensor | None, use_batch_stats: bool,
                   factor: float) -> torch.Tensor:
        """The arithmetic, on arguments ``forward`` has checked (no re-checks)."""
        run = IMPLEMENTATIONS[self.impl].run
        return run(input, running_mean, running_var, self.weight, self.bias, use_batch_stats,
                   factor, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # Checkpoints older than num_batches_tracked (version < 2) load with 0, as torch's.
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (self.num_batches_tracked
                                   if self.num_batches_tracked is not None
                                   and self.num_batches_tracked.device != torch.device("meta")
                                   else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input; a drop-in for ``torch.nn.BatchNorm1d``.

    See the module docstring for the formula, momentum convention and modes.
    """

    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input; a drop-in for ``torch.nn.BatchNorm2d``."""

    _ranks = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, C, D, H, W) input; a drop-in for ``torch.nn.BatchNorm3d``."""

    _ranks = (5,)


class _LazyBatchNorm(LazyModuleMixin, _BatchNorm):
    """Learns ``num_features`` from the first input's dim 1, then becomes the concrete class."""

    cls_to_become: type[_BatchNorm] | None = None

    def __init__(self, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None,
                 *, bias: bool = True, impl: Impl = DEFAULT_IMPL) -> None:
        factory = {"device": device, "dtype": dtype}
        # affine/track False: build with 0 features so nothing is registered eagerly.
        super().__init__(0, eps, momentum, False, False, impl=impl, **factory)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = UninitializedParameter(**factory)
            if bias:
                self.bias = UninitializedParameter(**factory)
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory)
            self.running_var = UninitializedBuffer(**factory)
            self.num_batches_tracked = torch.tensor(
                0, dtype=torch.long, device=factory["device"])

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, input: torch.Tensor) -> None:  # called by LazyModuleMixin
        if self.num_features == 0:
            self._check_input_dim(input)
            check_input(input, None, False)
            self.num_features = input.shape[1]
            if self.affine:
                self.weight.materialize((self.num_features,))
                if self.bias is not None:
                    self.bias.materialize((self.num_features,))
            if self.track_running_stats:
                self.running_mean.materialize((self.num_features,))
                self.running_var.materialize((self.num_features,))
            self.reset_parameters()


class LazyBatchNorm1d(_LazyBatchNorm, BatchNorm1d):
    """``BatchNorm1d`` whose ``num_features`` is read from the first input."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNorm, BatchNorm2d):
    """``BatchNorm2d`` whose ``num_features`` is read from the first input."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNorm, BatchNorm3d):
    """``BatchNorm3d`` whose ``num_features`` is read from the first input."""

    cls_to_become = BatchNorm3d


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch norm, torch's (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``,
    their lazy forms) or bnlab's (``BatchNorm*d`` and every layer built on it: ghost, renorm,
    noisy, sync). bnlab's frozen batch norm is not one: it has no batch statistics."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, _BatchNorm))


def replace_all_batch_norm_modules_(root: nn.Module) -> nn.Module:
    """Stop every batch norm in ``root`` (torch's and bnlab's) tracking running statistics,
    in place; return ``root``.

    ``torch.func.replace_all_batch_norm_modules_`` does this to torch's modules so that
    ``vmap`` can run them in training mode (an in-place update of unbatched running
    statistics by a batch of statistics is impossible); it recognises batch norm by
    ``isinstance(m, torch.nn.modules.batchnorm._BatchNorm)``, which bnlab's modules are
    not. Afterwards both modes normalize with the batch's statistics.
    """
    torch.func.replace_all_batch_norm_modules_(root)
    for module in root.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None
            module.track_running_stats = False
    return root


_TORCH_TO_BNLAB: dict[type[nn.Module], type[_BatchNorm]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


def _convert_one(bn: nn.Module, impl: Impl) -> nn.Module:
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError(
            f"cannot convert an uninitialized {type(bn).__name__}: run one batch through "
            "the model first (or use bnlab.nn.Lazy* modules directly)")
    target = _TORCH_TO_BNLAB.get(type(bn))
    if target is None:  # SyncBatchNorm, subclasses: different semantics, leave alone
        return bn
    ref = bn.weight if bn.weight is not None else bn.running_mean
    new = target(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                 device=None if ref is None else ref.device,
                 dtype=None if ref is None else ref.dtype, bias=bn.bias is not None, impl=impl)
    return take_state(bn, new)


def take_state(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` (a batch norm of another class, built with ``old``'s settings) with ``old``'s
    state: the same Parameter and buffer objects (so optimizers and references keep working,
    bit-identical), its mode and its ``qconfig``. The one rule of every conversion
    (``convert_batchnorm``, ``to_torch``, ``SyncBatchNorm.convert_sync_batchnorm``)."""
    if old.affine:
        new.weight = old.weight
        if old.bias is not None:
            new.bias = old.bias
    if old.track_running_stats:
        new.running_mean = old.running_mean
        new.running_var = old.running_var
        new.num_batches_tracked = old.num_batches_tracked
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def convert_batchnorm(module: nn.Module, *, impl: Impl = DEFAULT_IMPL) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` by bnlab's; return it.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: works in place on children
    and returns the (possibly new) root. State is kept exactly: the very same weight and
    bias Parameters (so ``requires_grad`` and optimizer references carry over), the same
    running-statistics buffers and ``num_batches_tracked``, device, dtype and train/eval
    mode.

    Left alone, on purpose: ``SyncBatchNorm`` (its cross-process reduction is the point
    of using it) and any other subclass of torch's batch norms (it may override
    behaviour we would silently drop). An uninitialized ``LazyBatchNorm*`` raises
    ``ValueError``: it has no state to carry yet, so run one batch first.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module = _convert_one(module, impl)
    for name, child in module.named_children():
        new_child = convert_batchnorm(child, impl=impl)
        if new_child is not child:
            module.add_module(name, new_child)
    return module
