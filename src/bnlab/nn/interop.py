"""From bnlab's batch norms back to torch's: ``to_torch``, the inverse of ``convert_batchnorm``.

Why: a model trained with bnlab's layers should leave the lab as a plain torch model,
for tools that recognise only ``torch.nn.BatchNorm*`` (torch's conv-BN fuser,
quantization, ``torch.onnx.export``'s BatchNormalization op, other people's code).
"""

from __future__ import annotations

from torch import nn

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm, take_state
from bnlab.nn.batchnorm_act import unfuse_batch_norm_act

__all__ = ["to_torch"]

_BNLAB_TO_TORCH: dict[type[nn.Module], type[nn.modules.batchnorm._BatchNorm]] = {
    BatchNorm1d: nn.BatchNorm1d,
    BatchNorm2d: nn.BatchNorm2d,
    BatchNorm3d: nn.BatchNorm3d,
}


def _to_torch_one(bn: _BatchNorm) -> nn.Module:
    target = _BNLAB_TO_TORCH[type(bn)]
    ref = bn.weight if bn.weight is not None else bn.running_mean
    new = target(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                 device=None if ref is None else ref.device,
                 dtype=None if ref is None else ref.dtype, bias=bn.bias is not None)
    return take_state(bn, new)


def to_torch(module: nn.Module) -> nn.Module:
    """Replace every bnlab ``BatchNorm1d/2d/3d`` in ``module`` by torch's; return the root.
    A ``BatchNormAct1d/2d/3d`` becomes torch's batch norm and its activation module
    (``bnlab.nn.unfuse_batch_norm_act``: into the ``nn.Identity`` after it, if there is one,
    else ``nn.Sequential(batch norm, activation)``).

    In place on children, returning the (possibly new) root, exactly as
    ``bnlab.nn.convert_batchnorm`` does in the other direction: the very same weight and
    bias Parameters and running-statistics buffers (so the state is bit-identical and
    optimizer references carry over), ``num_batches_tracked``, eps, momentum, device,
    dtype and train/eval mode. ``convert_batchnorm(to_torch(m), impl=...)`` gives bnlab's
    modules back (the ``impl`` is not something torch's modules hold).

    Left alone: bnlab's ghost, renorm and frozen layers (torch has no equivalent; their
    ``eval()`` output is plain batch norm, so ``bnlab.nn.fold.fold_batch_norm`` or a frozen
    copy is the way to export them). An uninitialized lazy layer raises ``ValueError``.
    """
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(f"cannot convert the uninitialized {type(m).__name__} "
                             f"{name or 'model'!r}: run one batch through the model first")
    return _replace(unfuse_batch_norm_act(module))


def _replace(module: nn.Module) -> nn.Module:
    if type(module) in _BNLAB_TO_TORCH:
        return _to_torch_one(module)
    for name, child in module.named_children():
        new_child = _replace(child)
        if new_child is not child:
            module.add_module(name, new_child)
    return module
