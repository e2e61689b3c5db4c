"""The implementations the tests run: impl='cpp' builds a C++ extension, so it runs where
a compiler and ninja are present and is reported as skipped, saying what is missing,
elsewhere."""

from __future__ import annotations

import pytest

from bnlab._cpp import build_requirements_missing

CPP_MISSING = build_requirements_missing()
CPP_SKIP = pytest.mark.skipif(bool(CPP_MISSING),
                              reason="impl='cpp' cannot build here: lacks "
                              + " and ".join(CPP_MISSING))
# Parametrize with these; iterate over RUNNABLE.
IMPL_PARAMS = ["fast", "reference", pytest.param("cpp", marks=CPP_SKIP)]
RUNNABLE = ["fast", "reference"] + ([] if CPP_MISSING else ["cpp"])
