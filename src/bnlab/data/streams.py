"""Test streams: the order in which a test set reaches a model that adapts while it predicts.

Why: test-time adaptation through batch norm (``bnlab.probes.adaptation``) normalizes each
test batch with that batch's statistics, so its accuracy depends on what a batch holds,
not only on the images. An i.i.d. stream gives every batch the test set's statistics;
a class-sorted or class-imbalanced stream does not, and that is where BN-adapt and TENT
are known to break. Each order here is a pure function of the labels and a seed.

* ``iid``: a random permutation.
* ``class-sorted``: all of class 0, then class 1, ... (each class in random order), so a
  batch holds one or two classes: the most non-i.i.d. stream a labelled set gives.
* ``imbalanced``: a long-tailed subset, class k (0..K-1) keeping the fraction
  ``imbalance ** (k / (K - 1))`` of its images (class 0 all, class K-1 ``imbalance``),
  shuffled: the label distribution shifts away from the training set's uniform one.
"""

from __future__ import annotations

import numpy as np
import torch

ORDERS = ("iid", "class-sorted", "imbalanced")

DEFAULT_IMBALANCE = 0.1
"""Fraction of the rarest class kept by the ``imbalanced`` order (a 10:1 long tail)."""

Batch = tuple[torch.Tensor, torch.Tensor]


def stream_order(labels: torch.Tensor, order: str, seed: int = 0,
                 imbalance: float = DEFAULT_IMBALANCE) -> torch.Tensor:
    """The indices of ``labels`` (int64 (N,)) in the order ``order`` (:data:`ORDERS`);
    all of them except for ``imbalanced``, which keeps a long-tailed subset."""
    if order not in ORDERS:
        raise ValueError(f"unknown stream order {order!r}; expected one of {ORDERS}")
    if not 0 < imbalance <= 1:
        raise ValueError(f"expected 0 < imbalance <= 1 (got {imbalance})")
    rng = np.random.default_rng([seed, ORDERS.index(order)])
    labels_np = labels.detach().cpu().numpy()
    permutation = rng.permutation(len(labels_np))  # (N,)
    if order == "iid":
        return torch.from_numpy(permutation)
    if order == "class-sorted":
        return torch.from_numpy(permutation[np.argsort(labels_np[permutation], kind="stable")])
    classes = np.unique(labels_np)
    kept = []
    for rank, label in enumerate(classes):
        members = permutation[labels_np[permutation] == label]
        fraction = imbalance ** (rank / max(len(classes) - 1, 1))
        kept.append(members[:max(1, round(fraction * len(members)))])
    chosen = np.concatenate(kept)
    return torch.from_numpy(chosen[rng.permutation(len(chosen))])


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, order: str = "iid",
            seed: int = 0, imbalance: float = DEFAULT_IMBALANCE,
            device: torch.device | str | None = None) -> list[Batch]:
    """``images`` (uint8 (N, 28, 28)) and ``labels`` in :func:`stream_order`, as batches of
    ``batch_size`` (the last may be smaller): x float32 (B, 1, 28, 28) in [0, 1] (as
    ``bnlab.data.loader.Loader`` makes them), y int64 (B,)."""
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1 (got {batch_size})")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    index = stream_order(labels, order, seed, imbalance)
    out = []
    for start in range(0, len(index), batch_size):
        chosen = index[start:start + batch_size]  # (B,)
        x = images[chosen].unsqueeze(1).to(device=device, dtype=torch.float32).div_(255)
        out.append((x, labels[chosen].to(device=device, dtype=torch.int64)))  # (B, 1, 28, 28), (B,)
    return out
