"""How much an epoch costs with bnlab's in-memory Loader versus the usual per-sample DataLoader.

Why: bnlab batches Fashion-MNIST with one index op per batch instead of a Python call per
image. This benchmark puts a number on that choice: one full training epoch of each,
timed round-robin in the same process so that machine load affects both alike, with
the per-sample side built the way torchvision's dataset is (one float image and an int
label per ``__getitem__``, default collate, no worker processes).
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset

from bnlab.bench.timing import time_interleaved
from bnlab.data.dataset import load_fashion_mnist
from bnlab.data.loader import Loader
from bnlab.util.tables import format_table


class PerSampleDataset(Dataset):
    """A map-style dataset returning one (float image (1, 28, 28) in [0, 1], int label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images  # (N, 28, 28) uint8
        self.labels = labels  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].unsqueeze(0)  # (28, 28) -> (1, 28, 28)
        return image.to(torch.float32).div_(255), int(self.labels[index])


def consume_epoch(batches) -> None:
    """Iterate every batch and touch it, so no loader can skip work lazily."""
    for x, y in batches:
        x.sum()
        y.sum()


def run_loader_benchmark(root: str | os.PathLike | None, batch_size: int = 128,
                         repeats: int = 3) -> str:
    """Median seconds per training epoch of each loader, as a table with their ratio."""
    ds = load_fashion_mnist(root)
    ours = Loader(ds.train_images, ds.train_labels, batch_size, shuffle=True, seed=0)
    theirs = DataLoader(PerSampleDataset(ds.train_images, ds.train_labels),
                        batch_size=batch_size, shuffle=True, num_workers=0)

    def bnlab_epoch() -> None:
        ours.set_epoch(ours.epoch + 1)
        consume_epoch(ours)

    medians = time_interleaved(
        {"bnlab Loader": bnlab_epoch, "torch DataLoader (per-sample)": lambda: consume_epoch(theirs)},
        repeats=repeats, warmup=1)
    baseline = medians["bnlab Loader"]
    rows = [[name, f"{seconds:.3f}", f"{len(ours) / seconds:,.0f}", f"{seconds / baseline:.1f}x"]
            for name, seconds in medians.items()]
    header = (f"One training epoch: {len(ds.train_labels)} images, batch {batch_size}, "
              f"{len(ours)} batches; median of {repeats} interleaved epochs each, "
              f"{torch.get_num_threads()} torch threads, CPU.")
    table = format_table(["loader", "s/epoch", "batches/s", "time vs bnlab"], rows)
    ratio = medians["torch DataLoader (per-sample)"] / baseline
    return f"{header}\n{table}\nratio, per-sample DataLoader time / bnlab Loader time: {ratio:.1f}x"
