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

.PHONY: install venv demo test test-integration test-tools lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

# DeepSpeed ships as an sdist whose build imports torch; building it in the venv
# (no build isolation) keeps pip from pulling a second, CUDA, torch into the build env.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install --no-build-isolation -e ".[dev]"
	touch $@

# `make install` always reinstalls; `make venv`, demo and test reinstall only when pyproject.toml changed (the
# cluster launcher's setup commands run on every `ray up`).
install: | $(BIN)/python
	rm -f $(VENV)/.installed
	$(MAKE) $(VENV)/.installed

venv: $(VENV)/.installed

# Synthetic data, shards, the six recipes trained on local Ray, evaluation, reports/pipeline/report.md.
demo: $(VENV)/.installed
	$(BIN)/distpose pipeline configs/quick

# The tests run real servers and schedulers: Prometheus and promtool (tests/test_monitor.py, tests/test_cluster.py),
# Slurm and munge (tests/test_slurm.py), sshd and rsync (tests/test_ray_launcher.py). As root on Debian or Ubuntu the
# distribution's packages are installed when a tool is missing; elsewhere put them on PATH. The tests start their
# own daemons, with their own files and ports, and stop them; installing starts none where systemd does not run.
TEST_TOOLS := prometheus promtool slurmctld slurmd munged sshd rsync
TEST_PACKAGES := prometheus slurm-wlm munge openssh-server openssh-client rsync
test-tools:
	@missing=$$(for tool in $(TEST_TOOLS); do command -v $$tool >/dev/null || echo $$tool; done); \
	[ -z "$$missing" ] || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null || { \
	    echo "make: missing:" $$missing "(Debian: apt-get install $(TEST_PACKAGES))"; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEST_PACKAGES); }

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
