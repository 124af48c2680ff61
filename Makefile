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

.PHONY: install demo test test-integration test-tools lint clean

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

# Synthetic data, shards, the six recipes trained on local Ray, evaluation, reports/pipeline/report.md.
demo: $(VENV)/.installed
	$(BIN)/distpose pipeline configs/quick

# The tests run a real Prometheus server and promtool (tests/test_monitor.py, tests/test_cluster.py). As root on
# Debian or Ubuntu the distribution's package is installed when they are missing; elsewhere put both on PATH.
test-tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null || { \
	    echo "make: prometheus and promtool are missing: install them (Debian: apt-get install prometheus)"; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

# The suite without the tests marked integration (those that start Ray, DeepSpeed or a whole command on them;
# tests/conftest.py marks every test that uses the shared Ray). CI runs both targets (.ci/run).
test: $(VENV)/.installed test-tools
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

test-integration: $(VENV)/.installed test-tools
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check distpose tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
