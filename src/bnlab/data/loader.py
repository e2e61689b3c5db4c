"""Batches of Fashion-MNIST straight from one uint8 tensor, and deterministic subsets.

Why: the whole dataset is 55 MB, and a per-sample ``Dataset`` would spend most of an
epoch in Python (``bnlab bench loader`` measures it). An epoch's order is a pure
function of ``(seed, epoch)``, so a resumed run replays the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from bnlab.data.dataset import CLASSES
from bnlab.util.errors import DatasetError


def stratified_subset(images: torch.Tensor, labels: torch.Tensor,
                      n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples taken class by class (n // 10 each, the remainder to the
    lowest classes), in their original order. Deterministic: no randomness involved."""
    if not 0 < n <= len(labels):
        raise DatasetError(f"subset size must be in 1..{len(labels)}, got {n}")
    per_class = [n // len(CLASSES) + (c < n % len(CLASSES)) for c in range(len(CLASSES))]
    chosen = []
    for c, count in enumerate(per_class):
        members = torch.nonzero(labels == c).flatten()  # (examples of class c,)
        if len(members) < count:
            raise DatasetError(f"subset of {n} needs {count} examples of class {c} "
                               f"({CLASSES[c]}), only {len(members)} exist")
        chosen.append(members[:count])
    index = torch.cat(chosen).sort().values  # (n,)
    return images[index], labels[index]


class Loader:
    """Batches from in-memory uint8 images: x float32 (B, 1, 28, 28) in [0, 1], y int64 (B,).

    The order of an epoch is a pure function of ``(seed, epoch)``: call ``set_epoch``
    before each epoch (iterating does not advance it), and a resumed run replays the
    same batches. Images live on ``device`` as uint8; each batch is gathered with one
    index op and converted to float there.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 device: torch.device | str | None = None) -> None:
        if len(images) != len(labels):
            raise DatasetError(f"Loader: {len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"Loader: batch_size must be at least 1, got {batch_size}")
        self.images = images.to(device)  # (N, 28, 28) uint8
        self.labels = labels.to(device, torch.int64)  # (N,)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self) -> torch.Tensor:
        """The sample indices of the current epoch, shape (N,)."""
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n)
        mixed = np.random.SeedSequence((self.seed, self.epoch)).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(mixed) & (2**63 - 1))
        return torch.randperm(n, generator=generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order().to(self.images.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]  # (B,)
            x = self.images[index].unsqueeze(1)  # (B, 28, 28) -> (B, 1, 28, 28) uint8
            yield x.to(torch.float32).div_(255), self.labels[index]
