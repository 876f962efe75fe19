# Quick start: `make demo` (set up, then run the main job on generated data), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch comes first, pinned. From the default package index, `torch==2.13.0` on Linux x86_64 is
# the CUDA build (several GB of NVIDIA libraries); `make setup TORCH_INDEX=cpu` takes the CPU-only
# build from PyTorch's own index instead (about 200 MB). Any other value is used as the index URL.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_INDEX_URL := $(if $(filter cpu,$(TORCH_INDEX)),https://download.pytorch.org/whl/cpu,$(TORCH_INDEX))

.PHONY: setup demo test lint bench-reference

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the pinned PyTorch first (TORCH_INDEX=cpu: the CPU-only build): an unpinned torch pulls
	# the newest CUDA build
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) $(TORCH)

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
	$(BIN)/python -m benchmarks.run --only b
