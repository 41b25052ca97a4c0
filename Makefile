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

DEMO := runs/demo

# The toy world, a task-1 detector trained on it (resumable), and detections drawn on
# test images (shapes of classes never taught are drawn as `unknown`, in magenta).
demo: $(STAMP)
	test -d $(DEMO)/toy-data || $(BIN)/ore make-toy-data --out $(DEMO)/toy-data
	$(BIN)/ore train --config toy/t1_train.yaml --output $(DEMO)/t1_train --resume \
		DATASETS.ROOT=$(DEMO)/toy-data
	$(BIN)/ore detect --config toy/t1_train.yaml --weights $(DEMO)/t1_train/model_final.pth \
		$(DEMO)/toy-data/JPEGImages/00169*.jpg --output $(DEMO)/detections

test: $(DEV_STAMP)
	$(BIN)/ruff check ore tests tools datasets
	$(BIN)/python -m pytest -q tests

lint: $(DEV_STAMP)
	$(BIN)/ruff check ore tests tools datasets

clean:
	rm -rf $(VENV) runs build *.egg-info
