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
# pytest-xdist workers: one per core by default (`make test PYTEST_JOBS=0` runs in one process).
PYTEST_JOBS ?= auto

BIN   := $(VENV)/bin
STAMP := $(VENV)/.bnlab-installed

.PHONY: demo test test-fast env kernel data data-if-possible browser site-screenshot lint clean \
	strip-notebook quick-times

demo: data kernel
	$(BIN)/bnlab demo $(DEMO_ARGS)

# The same set-up as the demo; the suite needs no real data (its one real-data test skips,
# saying why, where Fashion-MNIST cannot be had), so a failed fetch does not stop it; and
# Debian's chromium for the site's browser test (which skips, saying why, without it).
# Lint first: CI runs `make test`, so it enforces ruff too.
test: lint data-if-possible kernel browser
	$(BIN)/python -m pytest -n $(PYTEST_JOBS) $(PYTEST_ARGS)

# The edit loop: lint and every test not marked slow (the end-to-end grids, demo and CLI runs).
test-fast: lint kernel
	$(BIN)/python -m pytest -n $(PYTEST_JOBS) -m "not slow" $(PYTEST_ARGS)

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

# Debian's chromium, for the test that opens the site in a browser: installed where it is
# missing and apt works as root (a no-op once installed); elsewhere set-up carries on, saying so.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the site's browser test"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	      >/dev/null; } || echo "could not install chromium: the browser test will skip"; \
	  else echo "no chromium, and no apt-get as root to install it: the browser test will skip"; \
	  fi; }

# The README's picture of the site: `bnlab lab` first (SITE is the site it wrote).
SITE ?= runs/exp/site
site-screenshot: browser
	scripts/site_screenshot.sh $(SITE) docs/site-index.png

# Every experiment's --quick timed alone against its 3-minute budget: a benchmark, for an
# otherwise idle machine (a timed test would only measure the machine's load).
quick-times: data kernel
	$(BIN)/python scripts/quick_times.py

# bnlab's C++ batch-norm kernel, built once per machine and torch (a no-op when built).
# Without a compiler or ninja the build fails with a one-line reason and set-up carries
# on: impl="auto" then uses the fast path and says so.
kernel: env
	-$(BIN)/bnlab kernel build

lint: env
	$(BIN)/python -m ruff check src tests scripts

# The notebook is committed without outputs: run this before committing it.
strip-notebook: env
	$(BIN)/python -c "import nbformat as f, sys; p = sys.argv[1]; nb = f.read(p, 4); \
	[c.update(outputs=[], execution_count=None) for c in nb.cells if c.cell_type == 'code']; \
	f.write(nb, p)" notebooks/batch_norm.ipynb

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
