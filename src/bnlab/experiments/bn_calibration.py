"""Synthetic cases with known answers for the measures built on batch-norm statistics.

Why: ``precise`` and ``batchsize`` judge Wu & Johnson's claims with accuracy differences
that depend on which statistics a batch norm uses: EMA against population statistics,
mini-batch against population statistics, training against test images. A measure that
cannot see its effect would make such a verdict meaningless, so each is read on inputs
whose answer is known exactly, where the effect is absent and where it is large.

The case (:func:`one_hot_model`, :func:`one_hot_images`): an image of class k is blank but
for pixel k of its first row, at ``level``; the model copies pixels 0-9 to ten channels
(a fixed linear map) and batch-normalizes them (bnlab's ``BatchNorm1d``, no affine); the
prediction is the largest normalized channel. With statistics of balanced one-hot images,
or of any batch with more than one class in it, channel k is the only one above its mean
for an image of class k, so every image is classified as its class: accuracy is the
fraction of labels that match the images, exactly, in train or eval mode. The statistics
are then made wrong in a stated way, and the accuracy that follows is counted in closed
form (the functions' docstrings say how).
"""

from __future__ import annotations

import torch
from torch import nn

from bnlab.nn import BatchNorm1d

CLASSES = 10
SIDE = 28


def balanced_labels(n: int) -> torch.Tensor:
    """``n`` labels, classes 0-9 in turn (balanced when 10 divides ``n``), int64 (n,)."""
    return torch.arange(n) % CLASSES


def one_hot_images(labels: torch.Tensor, level: int = 255, offset: int = 0,
                   offset_channels: int = 0) -> torch.Tensor:
    """uint8 images (N, 28, 28): pixel ``labels[i]`` of row 0 at ``level``, plus ``offset``
    on pixels ``0 .. offset_channels - 1`` of row 0 in every image (a constant shift of
    those channels: what a change of input distribution does to a batch norm's input)."""
    images = torch.zeros(len(labels), SIDE, SIDE, dtype=torch.int32)
    images[:, 0, :offset_channels] += offset
    images[torch.arange(len(labels)), 0, labels] += level
    if images.max() > 255:
        raise ValueError(f"level {level} + offset {offset} does not fit a uint8 pixel")
    return images.to(torch.uint8)


def one_hot_model() -> nn.Module:
    """Flatten, copy pixels 0-9 of row 0 to channels 0-9, batch-normalize (no affine):
    (N, 1, 28, 28) -> (N, 10) logits."""
    pick = nn.Linear(SIDE * SIDE, CLASSES, bias=False)
    with torch.no_grad():
        pick.weight.zero_()
        pick.weight[torch.arange(CLASSES), torch.arange(CLASSES)] = 1.0  # pixel c of row 0
    pick.requires_grad_(False)
    return nn.Sequential(nn.Flatten(), pick, BatchNorm1d(CLASSES, affine=False))


def flipped(labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """``labels`` with the first ``round(fraction * N)`` moved to the next class: images
    whose label is wrong, so any model that classifies the image loses exactly that
    fraction of accuracy."""
    out = labels.clone()
    count = round(fraction * len(labels))
    out[:count] = (out[:count] + 1) % CLASSES
    return out
