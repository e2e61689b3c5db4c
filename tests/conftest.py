"""Shared fixtures: a small, learnable, synthetic Fashion-MNIST so no test needs the real one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bnlab.data import FashionMNIST

# The suite's tensors are tiny: one intra-op thread is faster than two, and keeps the suite's
# time steady on a loaded machine (OpenMP threads spin-waiting on busy cores are very slow).
torch.set_num_threads(1)


def make_synthetic_fashion(n_train: int = 1200, n_test: int = 200, seed: int = 0) -> FashionMNIST:
    """Ten classes, each a fixed random 28x28 template plus noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 28, 28, generator=g)  # (10, 28, 28)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 10  # balanced classes
        noise = torch.rand(n, 28, 28, generator=g)
        images = (0.6 * templates[labels] + 0.4 * noise) * 255  # (n, 28, 28)
        return images.to(torch.uint8), labels

    train_images, train_labels = split(n_train)
    test_images, test_labels = split(n_test)
    return FashionMNIST(train_images, train_labels, test_images, test_labels,
                        root=Path("synthetic"), found_via="synthetic")


@pytest.fixture(scope="session")
def synthetic_fashion() -> FashionMNIST:
    return make_synthetic_fashion()


# Devices the parity tests run on: CUDA where there is one, reported as skipped elsewhere.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"))]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)
