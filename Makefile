# Quick start: `make demo` (set up, then run the main job on generated data), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench-reference

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the pinned CPU build of PyTorch first: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m app.train --demo --output runs/demo --overwrite

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# the peer: the reference network in TensorFlow/Keras, in its own environment, timed beside the app
.venv-reference/bin/python:
	$(PYTHON) -m venv .venv-reference
	.venv-reference/bin/pip install --quiet --upgrade pip
	.venv-reference/bin/pip install --quiet tensorflow-cpu

bench-reference: setup .venv-reference/bin/python
	$(BIN)/python benchmarks/run.py --only b
