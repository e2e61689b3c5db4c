"""Frozen batch norm: a batch norm whose statistics and affine never change.

Why: fine-tuning with small batches (detection, segmentation) or on a new domain often
wants the pretrained normalization kept as it is, in every mode: no batch statistics,
no running-average updates, no learnable gamma/beta. A frozen layer is exactly a trained
batch norm in ``eval()``, forever, whatever ``train()``/``eval()`` says.

Formula, in every mode, per channel c (dim 1)::

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias

computed by ``bnlab.functional.batch_norm`` with ``training=False``. ``weight``/``bias``
are buffers, not parameters: no optimizer sees them, and the gradient flows only to the
input. Nothing is ever written to a buffer in ``forward``.

State: the ``state_dict`` has batch norm's keys (``weight``, ``bias``, ``running_mean``,
``running_var``; the affine keys only with ``affine=True``) in batch norm's version-1
layout, i.e. without ``num_batches_tracked``: torch's and bnlab's batch norms load it,
keeping their own ``num_batches_tracked`` (as for any version-1 checkpoint). Loading a
batch norm's ``state_dict`` into a frozen layer accepts ``num_batches_tracked`` and
ignores it for the math; it is kept, outside the ``state_dict``, only so that
:func:`unfreeze_batch_norm` can give it back.

A fresh layer holds running mean 0, variance 1, weight 1, bias 0, i.e. ``y = x / sqrt(1 +
eps)``: load statistics (``load_state_dict``, :func:`freeze_batch_norm`) before use.
Training a model with fresh frozen layers (``bnlab train --norm frozen``) is training
without normalization; the registry entry is meant for inference and as a baseline.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bnlab.functional import batch_norm as functional_batch_norm
from bnlab.functional import check_input
from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm, is_batch_norm
from bnlab.nn.batchnorm_act import unfuse_batch_norm_act

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
           "freeze_batch_norm", "unfreeze_batch_norm"]


class _FrozenBatchNorm(nn.Module):
    """Shared body of FrozenBatchNorm1d/2d/3d; see the module docstring."""

    _version = 1  # batch norm's state_dict layout without num_batches_tracked
    _ranks: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True,
                 device: Any = None, dtype: Any = None, *, bias: bool = True) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.register_buffer("weight", torch.ones(num_features, **factory) if affine else None)
        self.register_buffer("bias", torch.zeros(num_features, **factory)
                             if affine and bias else None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        # Not part of the math nor of the state_dict: what unfreeze_batch_norm gives back.
        self.register_buffer("num_batches_tracked",
                             torch.tensor(0, dtype=torch.long, device=device), persistent=False)
        self.source: tuple[type[nn.Module], dict[str, Any]] | None = None

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() not in self._ranks:
            wanted = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"expected {wanted} input (got {input.dim()}D input)")
        check_input(input, self.num_features, False)
        return functional_batch_norm(input, self.running_mean, self.running_var, self.weight,
                                     self.bias, False, 0.0, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        tracked = state_dict.pop(prefix + "num_batches_tracked", None)  # accepted, ignored
        if tracked is not None:
            with torch.no_grad():
                self.num_batches_tracked.copy_(tracked)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C) or (N, C, L) input."""

    _ranks = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C, H, W) input."""

    _ranks = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C, D, H, W) input."""

    _ranks = (5,)


_TORCH_RANKS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
_FROZEN_BY_RANKS = {cls._ranks: cls for cls in
                    (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)}


def _ranks_of(bn: nn.Module) -> tuple[int, ...] | None:
    if isinstance(bn, _BatchNorm):
        return bn._ranks
    return next((r for cls, r in _TORCH_RANKS.items() if isinstance(bn, cls)), None)


def _source_config(bn: nn.Module) -> dict[str, Any]:
    """The constructor arguments (beyond ``num_features``) that rebuild ``bn``."""
    config = {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine,
              "bias": bn.bias is not None if bn.affine else True}
    if isinstance(bn, _BatchNorm):
        config["impl"] = bn.impl
        config.update({name: getattr(bn, name) for name in getattr(bn, "_extra_args", ())})
    return config


def _freeze_one(bn: nn.Module) -> _FrozenBatchNorm:
    ref = bn.running_mean
    frozen = _FROZEN_BY_RANKS[_ranks_of(bn)](bn.num_features, bn.eps, bn.affine,
                                              device=ref.device, dtype=ref.dtype,
                                              bias=bn.bias is not None)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            value = getattr(bn, name)
            if value is not None:
                getattr(frozen, name).copy_(value)
    frozen.source = (type(bn), _source_config(bn))
    frozen.train(bn.training)
    return frozen


def _swap(module: nn.Module, match, convert) -> nn.Module:
    if match(module):
        return convert(module)
    for name, child in module.named_children():
        new = _swap(child, match, convert)
        if new is not child:
            module.add_module(name, new)
    return module


def _is_freezable(m: nn.Module) -> bool:
    return (is_batch_norm(m)
            and _ranks_of(m) is not None)


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Replace every batch norm in ``model`` by a frozen one with its state; return the root.

    Works in place on children, like ``convert_batchnorm``; the root itself is returned
    replaced when it is a batch norm. Converted: torch's ``BatchNorm1d/2d/3d`` and bnlab's
    batch norms (plain, ghost, renorm; their prediction is plain batch norm, which is what
    the frozen layer computes). Kept per layer: weight, bias, running statistics, eps,
    device, dtype and train/eval flag; the original class and arguments are remembered
    for :func:`unfreeze_batch_norm`. A batch norm without running statistics cannot be
    frozen: ``ValueError`` before anything is replaced. ``SyncBatchNorm`` and lazy layers
    that are not yet initialized are refused the same way. A ``BatchNormAct`` is first split
    into batch norm and activation (``bnlab.nn.unfuse_batch_norm_act``: the activation takes
    the ``nn.Identity`` after it, if there is one), and its batch norm is frozen.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(f"cannot freeze the uninitialized lazy layer {name or 'model'!r} "
                             f"({type(m).__name__}): run one batch through the model first")
        if is_batch_norm(m):
            if _ranks_of(m) is None:
                raise ValueError(f"cannot freeze {name or 'model'!r} ({type(m).__name__}): "
                                 "only BatchNorm1d/2d/3d and bnlab's batch norms are supported")
            if m.running_mean is None:
                raise ValueError(f"cannot freeze {name or 'model'!r}: it has no running "
                                 "statistics (track_running_stats=False)")
    return _swap(unfuse_batch_norm_act(model), _is_freezable, _freeze_one)


def _unfreeze_one(frozen: _FrozenBatchNorm) -> nn.Module:
    if frozen.source is not None:
        cls, config = frozen.source
    else:  # built directly, not by freeze_batch_norm: bnlab's plain batch norm
        cls = {(2, 3): BatchNorm1d, (4,): BatchNorm2d, (5,): BatchNorm3d}[frozen._ranks]
        config = {"eps": frozen.eps, "affine": frozen.affine,
                  "bias": frozen.bias is not None if frozen.affine else True}
    ref = frozen.running_mean
    bn = cls(frozen.num_features, device=ref.device, dtype=ref.dtype, **config)
    with torch.no_grad():
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            getattr(bn, name).copy_(getattr(frozen, name))
        if frozen.affine:
            bn.weight.copy_(frozen.weight)
            if frozen.bias is not None:
                bn.bias.copy_(frozen.bias)
    bn.train(frozen.training)
    return bn


def unfreeze_batch_norm(model: nn.Module) -> nn.Module:
    """Replace every frozen batch norm in ``model`` by a trainable one; return the root.

    The inverse of :func:`freeze_batch_norm`: each layer becomes the class it was frozen
    from, with the same arguments (bnlab's ``BatchNorm1d/2d/3d`` for a layer built as
    frozen), its statistics, ``num_batches_tracked``, affine values (as fresh parameters,
    ``requires_grad=True``), device, dtype and train/eval flag.
    """
    return _swap(model, lambda m: isinstance(m, _FrozenBatchNorm), _unfreeze_one)
