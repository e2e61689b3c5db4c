"""Batch norm followed by an activation, in one module: ``BatchNormAct1d/2d/3d``.

Why: in a network, batch norm is almost always followed by an activation. As two modules
that is two passes over memory in each direction, and two tensors kept for backward (the
normalization's input and the activation's output). ``bnlab.functional.batch_norm_act``
computes both in one pass of the C++ kernel where it applies, keeping for backward only
what batch norm alone keeps (backward recomputes the activation's derivative from the
input); elsewhere it runs batch norm, then torch's activation. The result is the same
either way (see ``bnlab.functional``).

A drop-in for ``BatchNorm1d/2d/3d``: the same constructor plus ``activation`` (a key of
``bnlab.functional.ACTIVATIONS``: identity, relu, sigmoid, tanh), the same parameters,
buffers and ``state_dict`` keys, running statistics, modes and ``impl``. The activation is
also a child module, ``act`` (``nn.ReLU``, ``nn.Sigmoid``, ...), which holds no state.
``fused = False`` makes the module run batch norm, then ``self.act``, as two steps, so that
hooks on ``act`` see its input; :func:`unfused` does that for a whole model (the lab's
probes, which hook activation modules, use it).

Models: :func:`fuse_batch_norm_act` turns each bnlab ``BatchNorm*d`` directly followed by
``nn.ReLU``/``nn.Sigmoid``/``nn.Tanh`` inside an ``nn.Sequential`` into a ``BatchNormAct``
(same Parameter and buffer objects) and the activation's place into ``nn.Identity``, so
the model's indices and ``state_dict`` keys stay as they were. :func:`unfuse_batch_norm_act`
is its inverse; ``bnlab.nn.to_torch`` gives ``nn.Sequential(torch BN, activation)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from bnlab.functional import (
    ACTIVATIONS,
    DEFAULT_IMPL,
    IMPLEMENTATIONS,
    Impl,
    check_activation,
    run_batch_norm_act,
)
from bnlab.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    _BatchNorm,
    _LazyBatchNorm,
    take_state,
)

__all__ = [
    "ACTIVATION_MODULES",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "LazyBatchNormAct1d",
    "LazyBatchNormAct2d",
    "LazyBatchNormAct3d",
    "fuse_batch_norm_act",
    "unfuse_batch_norm_act",
    "unfused",
]

ACTIVATION_MODULES: dict[str, type[nn.Module]] = {
    "identity": nn.Identity, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
"""The module of each activation of ``bnlab.functional.ACTIVATIONS`` (the same keys)."""


class _BatchNormAct(_BatchNorm):
    """Shared body of BatchNormAct1d/2d/3d; see the module docstring."""

    _extra_args = ("activation",)  # constructor arguments beyond BN's (frozen.py)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: Any = None, *, bias: bool = True, impl: Impl = DEFAULT_IMPL,
                 activation: str = "relu") -> None:
        check_activation(activation)  # before anything is built
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, impl=impl)
        self._set_activation(activation)

    def _set_activation(self, activation: str) -> None:
        self.activation = activation
        self.act = ACTIVATION_MODULES[activation]()
        self.fused = True

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"

    def _normalize(self, input: torch.Tensor, running_mean: torch.Tensor | None,
                   running_var: torch.Tensor | None, use_batch_stats: bool,
                   factor: float) -> torch.Tensor:
        if not self.fused:  # two steps, so that hooks on self.act see its input
            return self.act(super()._normalize(input, running_mean, running_var,
                                               use_batch_stats, factor))
        return run_batch_norm_act(IMPLEMENTATIONS[self.impl], input, running_mean, running_var,
                                  self.weight, self.bias, use_batch_stats, factor, self.eps,
                                  self.activation)


class BatchNormAct1d(_BatchNormAct):
    """``BatchNorm1d`` then ``activation`` over (N, C) or (N, C, L) input, in one pass."""

    _ranks = BatchNorm1d._ranks


class BatchNormAct2d(_BatchNormAct):
    """``BatchNorm2d`` then ``activation`` over (N, C, H, W) input, in one pass."""

    _ranks = BatchNorm2d._ranks


class BatchNormAct3d(_BatchNormAct):
    """``BatchNorm3d`` then ``activation`` over (N, C, D, H, W) input, in one pass."""

    _ranks = BatchNorm3d._ranks


class _LazyBatchNormAct(_LazyBatchNorm):
    """Learns ``num_features`` from the first input, then becomes the concrete class."""

    def __init__(self, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None,
                 *, bias: bool = True, impl: Impl = DEFAULT_IMPL,
                 activation: str = "relu") -> None:
        check_activation(activation)
        super().__init__(eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         impl=impl)
        self._set_activation(activation)


class LazyBatchNormAct1d(_LazyBatchNormAct, BatchNormAct1d):
    """``BatchNormAct1d`` whose ``num_features`` is read from the first input."""

    cls_to_become = BatchNormAct1d


class LazyBatchNormAct2d(_LazyBatchNormAct, BatchNormAct2d):
    """``BatchNormAct2d`` whose ``num_features`` is read from the first input."""

    cls_to_become = BatchNormAct2d


class LazyBatchNormAct3d(_LazyBatchNormAct, BatchNormAct3d):
    """``BatchNormAct3d`` whose ``num_features`` is read from the first input."""

    cls_to_become = BatchNormAct3d


_FUSED = {BatchNorm1d: BatchNormAct1d, BatchNorm2d: BatchNormAct2d, BatchNorm3d: BatchNormAct3d}
_UNFUSED = {fused: plain for plain, fused in _FUSED.items()}
_FUSABLE = {cls: name for name, cls in ACTIVATION_MODULES.items() if name != "identity"}
assert set(ACTIVATION_MODULES) == set(ACTIVATIONS)  # one activation, one module


def _rebuilt(bn: _BatchNorm, classes: dict[type, type[_BatchNorm]], **extra: Any) -> _BatchNorm:
    """``bn``'s settings and state (the same objects: ``take_state``) in a module of the
    class ``classes`` maps its class to."""
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError(f"cannot convert an uninitialized {type(bn).__name__}: run one batch "
                         "through the model first")
    cls = classes[type(bn)]
    ref = bn.weight if bn.weight is not None else bn.running_mean
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
              device=None if ref is None else ref.device,
              dtype=None if ref is None else ref.dtype, bias=bn.bias is not None, impl=bn.impl,
              **extra)
    return take_state(bn, new)


def fuse_batch_norm_act(model: nn.Module) -> nn.Module:
    """Fuse, in place, every bnlab ``BatchNorm1d/2d/3d`` that an ``nn.ReLU``, ``nn.Sigmoid``
    or ``nn.Tanh`` directly follows inside an ``nn.Sequential``; return ``model``.

    Each pair becomes a ``BatchNormAct`` (the batch norm's very Parameters and buffers,
    mode, ``impl``; the activation module itself as its ``act``) followed by ``nn.Identity``
    in the activation's place, so indices and ``state_dict`` keys stay. torch's batch norms
    are left alone: ``bnlab.nn.convert_batchnorm`` them first.
    """
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        children = list(seq.named_children())
        for (first, bn), (second, act) in zip(children, children[1:], strict=False):
            if type(bn) in _FUSED and type(act) in _FUSABLE:
                fused = _rebuilt(bn, _FUSED, activation=_FUSABLE[type(act)])
                fused.act = act
                seq.add_module(first, fused)  # in its place: the order of children stays
                seq.add_module(second, nn.Identity())
    return model


def unfuse_batch_norm_act(model: nn.Module) -> nn.Module:
    """Split, in place, every ``BatchNormAct`` into bnlab's ``BatchNorm*d`` (the same
    Parameters and buffers) and its ``act``; return the (possibly new) root.

    The inverse of :func:`fuse_batch_norm_act`: where an ``nn.Identity`` follows the module
    in an ``nn.Sequential``, the activation takes its place (indices and ``state_dict``
    keys stay); elsewhere the module becomes ``nn.Sequential(batch norm, activation)``.
    """
    if isinstance(model, _BatchNormAct):
        return nn.Sequential(_rebuilt(model, _UNFUSED), model.act)
    for module in list(model.modules()):
        children = list(module.named_children())
        for index, (name, child) in enumerate(children):
            if not isinstance(child, _BatchNormAct):
                continue
            plain = _rebuilt(child, _UNFUSED)
            after = children[index + 1] if index + 1 < len(children) else None
            if (isinstance(module, nn.Sequential) and after is not None
                    and type(after[1]) is nn.Identity):
                module.add_module(name, plain)  # in its place: the order of children stays
                module.add_module(after[0], child.act)
            else:
                module.add_module(name, nn.Sequential(plain, child.act))
    return model


@contextlib.contextmanager
def unfused(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``BatchNormAct`` of ``model`` runs batch norm, then its ``act``
    module, as two steps (the same result), so that hooks on activation modules see their
    input; restored afterwards. Replaces no module."""
    modules = [m for m in model.modules() if isinstance(m, _BatchNormAct)]
    before = [m.fused for m in modules]
    try:
        for m in modules:
            m.fused = False
        yield model
    finally:
        for m, was in zip(modules, before, strict=True):
            m.fused = was
