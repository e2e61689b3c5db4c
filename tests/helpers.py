"""Helpers the tests share (fixtures are in conftest.py).

The implementations the tests run are read from bnlab.functional's registry. One that
compiles once (the C++ kernel) runs where a compiler and ninja are present and
is reported as skipped, saying what is missing, elsewhere; one that compiles each new
shape (torch.compile) is left out of the parity grids and tested on its own.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

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


def without_provenance(report: str) -> str:
    """A report without its provenance line (the date and command of the analysis), for
    comparing two analyses of the same runs."""
    return "\n".join(line for line in report.splitlines() if not line.startswith("**Provenance.**"))
