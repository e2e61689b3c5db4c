"""bnlab's batch-norm modules: drop-ins for ``torch.nn``'s, and the batch-norm family.

One concept per file, all re-exported here: ``batchnorm`` (``BatchNorm1d/2d/3d``, their lazy
forms, ``convert_batchnorm``, ``is_batch_norm``; the formula and conventions are stated in
``bnlab.functional``), ``batchnorm_act`` (``BatchNormAct1d/2d/3d``: batch norm and an
activation in one pass; ``fuse_batch_norm_act``, ``unfuse_batch_norm_act``, ``unfused``),
``ghost``, ``renorm``, ``frozen``, ``noisy``, ``sync``, ``precise`` (``update_bn_stats``),
``fold`` (``fold_batch_norm``) and ``interop`` (``to_torch``).
Importing this package loads none of bnlab's lab (training, experiments, plots).
"""

from bnlab.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    convert_batchnorm,
    is_batch_norm,
    replace_all_batch_norm_modules_,
)
from bnlab.nn.batchnorm_act import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    LazyBatchNormAct1d,
    LazyBatchNormAct2d,
    LazyBatchNormAct3d,
    fuse_batch_norm_act,
    unfuse_batch_norm_act,
    unfused,
)
from bnlab.nn.fold import fold_batch_norm
from bnlab.nn.frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze_batch_norm,
    unfreeze_batch_norm,
)
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from bnlab.nn.interop import to_torch
from bnlab.nn.noisy import NoisyBatchNorm1d, NoisyBatchNorm2d, without_noise
from bnlab.nn.precise import update_bn_stats
from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d
from bnlab.nn.sync import SyncBatchNorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d",
    "LazyBatchNorm3d", "convert_batchnorm", "is_batch_norm", "replace_all_batch_norm_modules_",
    "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "LazyBatchNormAct1d",
    "LazyBatchNormAct2d", "LazyBatchNormAct3d", "fuse_batch_norm_act", "unfuse_batch_norm_act",
    "unfused",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "BatchRenorm1d", "BatchRenorm2d",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze_batch_norm",
    "unfreeze_batch_norm", "NoisyBatchNorm1d", "NoisyBatchNorm2d", "without_noise", "SyncBatchNorm",
    "update_bn_stats", "fold_batch_norm", "to_torch",
]
