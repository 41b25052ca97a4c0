# `make demo` and `make test` both work on a fresh clone: they create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP) $@

# The toy world, ORE and the closed-set baseline on all four tasks, and runs/demo/report.html.
demo: $(STAMP)
	$(BIN)/ore demo --output runs/demo

test: $(DEV_STAMP)
	$(BIN)/ruff check ore tests tools datasets
	$(BIN)/python -m pytest -q tests

lint: $(DEV_STAMP)
	$(BIN)/ruff check ore tests tools datasets

clean:
	rm -rf $(VENV) runs build *.egg-info
