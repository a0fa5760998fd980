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

# Everything, end-to-end runs included (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests $(PYTEST_ARGS)

# Without the end-to-end runs of the command-line programs (marked e2e).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not e2e" tests $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m midog_jax.demo --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR)
