"""Measurements of finished runs' models, beyond what training recorded.

Why: several experiments evaluate a finished model again, in a mode or on images that
training did not use; one definition of "accuracy in train or eval mode" keeps those
numbers comparable between experiments. Such measurements are expensive (a model reload,
attacks, gradients), so experiments keep each one in its run folder with ``runs.cached``,
keyed by the measurement's settings and the :func:`fingerprint` of the images it used.
"""

from __future__ import annotations

import copy
import hashlib

import torch


def fingerprint(*tensors: torch.Tensor) -> str:
    """A short SHA-256 of the tensors' shapes, dtypes and contents: which images (and labels)
    a measurement was made on, for its cache key."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(f"{tuple(t.shape)} {t.dtype};".encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def accuracy_in_mode(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     training: bool, seed: int = 0, batch_size: int = 1000) -> float:
    """Accuracy of a copy of ``model`` in train or eval mode (the model and its BN buffers
    are untouched; dropout masks are seeded)."""
    probe = copy.deepcopy(model).train(training)
    torch.manual_seed(seed)
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size].unsqueeze(1).float().div(255)  # (B, 1, 28, 28)
        correct += (probe(x).argmax(dim=1) == labels[start:start + batch_size]).sum().item()
    return correct / len(labels)
