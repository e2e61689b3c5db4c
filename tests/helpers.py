"""Helpers the tests share (fixtures are in conftest.py).

The implementations the tests run are read from bnlab.functional's registry. One that
compiles once (the C++ kernel) runs where a compiler and ninja are present and
is reported as skipped, saying what is missing, elsewhere; one that compiles each new
shape (torch.compile) is left out of the parity grids and tested on its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bnlab.data.dataset import FashionMNIST
from bnlab.functional import IMPLEMENTATIONS
from bnlab.kernels.cpp import build_requirements_missing, has_cxx_compiler
from bnlab.training.norms import BNLAB_NORMS

CPP_MISSING = build_requirements_missing()
CPP_SKIP = pytest.mark.skipif(bool(CPP_MISSING),
                              reason="bnlab's C++ kernel cannot build here: lacks "
                              + " and ".join(CPP_MISSING))
# torch.compile's CPU backend (Inductor) writes and compiles C++: impl="compiled" needs a compiler.
COMPILED_SKIP = pytest.mark.skipif(not has_cxx_compiler(),
                                   reason="impl='compiled' (Inductor on CPU) needs a C++ compiler "
                                   "on PATH")
_GRID = [impl for impl in IMPLEMENTATIONS.values() if impl.compiles != "each shape"]
# Parametrize with these; iterate over RUNNABLE.
IMPL_PARAMS = [pytest.param(impl.name, marks=CPP_SKIP) if impl.compiles == "once" else impl.name
               for impl in _GRID]
RUNNABLE = [impl.name for impl in _GRID if impl.compiles == "no" or not CPP_MISSING]
# Compiling each new shape takes seconds: tests of it are in the slow tier.
COMPILED_MARKS = [COMPILED_SKIP, pytest.mark.slow]
# The norm names (bnlab.training.norms) of implementations that need a compiler, with their marks.
NORM_SKIPS = {norm: CPP_SKIP if IMPLEMENTATIONS[impl].compiles == "once" else COMPILED_MARKS
              for norm, impl in BNLAB_NORMS.items() if IMPLEMENTATIONS[impl].compiles != "no"}


# Devices the parity tests run on: CUDA where there is one, reported as skipped elsewhere.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"))]


def buffers(model: nn.Module) -> list[torch.Tensor]:
    """Copies of ``model``'s buffers (running statistics), to check they were left alone."""
    return [b.clone() for b in model.buffers()]


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
