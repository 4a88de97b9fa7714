# Two entry points that work on a fresh machine (Python 3.10+):
#   make train   set up .venv and train a small model on the built-in corpus
#   make test    set up .venv and run the test suite
#   make test-cuda   the GPU suite (tests/test_cuda.py) on a machine with a CUDA GPU
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
TORCH_VERSION ?= 2.13.0

$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so pip does not pick a newer multi-GB build: override with TORCH_VERSION=...
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[train,dev]"
	touch $(BIN)/activate

setup: $(BIN)/activate

train: setup
	$(BIN)/hybrid-lm train

test: setup
	$(BIN)/ruff check .
	# transformers' own common model tests, from its source distribution on the package index (once per version)
	$(BIN)/python tests/transformers_common/fetch.py
	# one torch thread per worker: two workers already fill two cores, more threads only contend
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile tests

# The suite above hides GPUs (tests/conftest.py); the GPU suite is a run of its own
test-cuda: setup
	$(BIN)/python -m pytest tests/test_cuda.py

.PHONY: setup train test test-cuda
