"""The validation split: training images held out so that choices never see the test set.

Why: an experiment that picks its best learning rate, its rates for other experiments or a
"best epoch" by test accuracy reports a number that was selected on the data it is measured
on. bnlab carves a validation split out of the 60000 training images instead: seeded and
class-stratified (``size // 10`` images of each class, the remainder to the lowest classes),
the same images for every run (the seed is fixed, not the run's), so runs that differ in
anything else are chosen between on the same validation images. The test set is then for
reporting only.
"""

from __future__ import annotations

import torch

from bnlab.data.dataset import CLASSES
from bnlab.util.errors import DatasetError

VALIDATION_SEED = 0
"""Seed of the split: fixed, so every run holds out the same images."""


def validation_split(images: torch.Tensor, labels: torch.Tensor, size: int,
                     seed: int = VALIDATION_SEED
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((train_images, train_labels), (val_images, val_labels))``: ``size`` images held out,
    class by class, chosen by a seeded permutation; both parts keep their original order.
    ``size = 0`` holds out nothing."""
    if not 0 <= size < len(labels):
        raise DatasetError(f"a validation split of {size} images needs more training images "
                           f"(there are {len(labels)}); expected 0 <= val_size < {len(labels)}")
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)  # (N,)
    for c in range(len(CLASSES)):
        count = size // len(CLASSES) + (c < size % len(CLASSES))
        members = torch.nonzero(labels == c).flatten()  # (examples of class c,)
        if len(members) <= count:
            raise DatasetError(f"a validation split of {size} images needs {count} examples of "
                               f"class {c} ({CLASSES[c]}) and some left to train on; there are "
                               f"{len(members)}")
        held[members[torch.randperm(len(members), generator=generator)[:count]]] = True
    return (images[~held], labels[~held]), (images[held], labels[held])
