# Two entry points for a fresh machine: `make demo` and `make test`.
# Both build the virtual environment they need in $(VENV).
#
# torch is pinned so this machine's local CPU build is used; override it, e.g.
#   make demo TORCH='torch==2.5.1' TORCH_INDEX='--index-url <your CUDA wheel index>'
PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_ARGS   ?=
PYTEST_ARGS ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.bnlab-installed

.PHONY: demo test test-fast env data data-if-possible lint clean

demo: data
	$(BIN)/bnlab demo $(DEMO_ARGS)

# The same set-up as the demo; the suite needs no real data (its one real-data test skips,
# saying why, where Fashion-MNIST cannot be had), so a failed fetch does not stop it.
# Lint first: CI runs `make test`, so it enforces ruff too.
test: lint data-if-possible
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The edit loop: lint and every test not marked slow (the end-to-end grids, demo and CLI runs).
test-fast: lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Finds and verifies Fashion-MNIST; downloads or installs it only when it is missing.
data: env
	$(BIN)/bnlab data fetch

data-if-possible: env
	-$(BIN)/bnlab data fetch

lint: env
	$(BIN)/python -m ruff check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
