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

.PHONY: demo test env kernel data data-if-possible lint clean

demo: data kernel
	$(BIN)/bnlab demo $(DEMO_ARGS)

# The same set-up as the demo; the suite needs no real data (its one real-data test skips,
# saying why, where Fashion-MNIST cannot be had), so a failed fetch does not stop it.
test: env data-if-possible kernel
	$(BIN)/python -m pytest $(PYTEST_ARGS)

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

# bnlab's C++ batch-norm kernel, built once per machine and torch (a no-op when built).
# Without a compiler or ninja the build fails with a one-line reason and set-up carries
# on: impl="auto" then uses the fast path and says so.
kernel: env
	-$(BIN)/bnlab kernel build

lint: env
	$(BIN)/python -m ruff check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
