# One entry point for install, demo and tests.
#
# TORCH is installed before everything else so that pip never resolves torch on its
# own: on a CPU-only machine with a local CPU wheel it stays small, and on a GPU
# machine `torch==X` from PyPI is the CUDA build. Override for other builds, e.g.
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

# DeepSpeed ships as an sdist whose build imports torch; building it in the venv
# (no build isolation) keeps pip from pulling a second, CUDA, torch into the build env.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install --no-build-isolation -e ".[dev]"
	touch $@

# `make install` always reinstalls; demo and test reinstall only when pyproject.toml changed.
install: | $(BIN)/python
	rm -f $(VENV)/.installed
	$(MAKE) $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/distpose data synth --out data/synth --train 1000 --val 100 --workers 2 --overwrite
	$(BIN)/distpose data shard --coco-root data/synth --split train --out data/shards --samples-per-shard 100 --overwrite
	$(BIN)/distpose data shard --coco-root data/synth --split val --out data/shards --samples-per-shard 50 --overwrite
	$(BIN)/distpose data verify data/shards --workers 2
	$(BIN)/distpose bench loader configs/quick/cnn.yaml

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check distpose kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
