"""Measurements of finished runs' models, beyond what training recorded.

Why: several experiments evaluate a finished model again, in a mode or on images that
training did not use; one definition of "accuracy in train or eval mode" keeps those
numbers comparable between experiments.
"""

from __future__ import annotations

import copy

import torch


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
