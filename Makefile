# `make demo` and `make test` each work on a fresh machine by themselves.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: install test test-fast demo clean

$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Two workers; each test file runs whole on one worker (its module fixtures,
# such as a trained workdir, are built once), in collection order: conftest.py
# puts the longest files, then the end-to-end runs, first so the long ones start at once.
# (pytest-xdist's xdist_group does nothing under pytest 9: it renames
# item._nodeid, which pytest 9 no longer reads.)
XDIST := -n 2 --dist loadscope --no-loadscope-reorder

# torch + torchvision (the "torch" extra, ~5.5 GB) for the pretrained-weights
# parity tests only; a separate stamp so `make demo` never installs it.
TORCH_STAMP := $(VENV)/.installed-torch

$(TORCH_STAMP): $(STAMP) setup.py
	$(BIN)/pip install -q -e ".[test,torch]"
	touch $(TORCH_STAMP)

# Everything, end-to-end runs included (what CI runs). MIDOG_REQUIRE_TORCH=1:
# the torch parity tests fail (not skip) if torch is missing.
test: $(STAMP) $(TORCH_STAMP)
	MIDOG_REQUIRE_TORCH=1 $(BIN)/python -m pytest -q $(XDIST) tests $(PYTEST_ARGS)

# Without the end-to-end runs of the command-line programs (marked e2e).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not e2e" tests $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m midog_jax.demo --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR)
