# Two commands on a fresh machine: `make run` and `make test`. Everything else is optional.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export PREFECT_HOME := $(CURDIR)/.prefect
# HF_HOME and HF_HUB_OFFLINE are left to bvpo (src/bvpo/runtime.py): offline with a cache in the
# project for the embedded model, the user's own cache and network for a hub model.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test test-fast install repro experiment ui serve stack-up stack-down stack-status bench bench-trl gpu-kit clean help

help:
	@echo "make run    - set up .venv, run the whole pipeline on the embedded default"
	@echo "make test   - set up .venv, run the test suite"
	@echo "make test-fast - the unit tests only (no training, sampling, flows or DVC runs)"
	@echo "make repro  - dvc repro (rebuild what params.yaml or the code changed)"
	@echo "make experiment - every method x 3 seeds as DVC experiments, with 95% intervals (TASK=judged: the judged task)"
	@echo "make ui     - MLflow UI on http://127.0.0.1:5000"
	@echo "make serve  - Prefect server on 127.0.0.1:4200 + a nightly round (CRON=... to change)"
	@echo "make stack-up - team mode: PostgreSQL + MLflow server + Prefect server + a worker (loopback)"
	@echo "make stack-down / stack-status - stop it / show what runs where"
	@echo "make bench  - training throughput benchmark"
	@echo "make bench-trl - the trainer vs TRL DPOTrainer on the same work (installs trl)"
	@echo "make gpu-kit - wheels for a GPU node without a package index, into .whl/ (installs trl)"

# uv installs the same pinned versions as pip, faster (53–80 s instead of 137 s from
# local wheels here, cold caches); it takes pip's index settings (index, extra indexes, find-links)
# from pip's environment or config and picks the best version across indexes as pip does. It must
# byte-compile: where PYTHONDONTWRITEBYTECODE is set, every import would compile from source. If
# uv cannot be installed (no network) or fails, plain pip.
PIP_INSTALL = if [ -x $(BIN)/uv ] && ( \
	  fl="$${PIP_FIND_LINKS:-$$($(BIN)/pip config get global.find-links 2>/dev/null)}"; \
	  ei="$${PIP_EXTRA_INDEX_URL:-$$($(BIN)/pip config get global.extra-index-url 2>/dev/null)}"; \
	  ix="$${PIP_INDEX_URL:-$$($(BIN)/pip config get global.index-url 2>/dev/null)}"; \
	  $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python --index-strategy unsafe-best-match \
	    $$(for u in $$ix; do echo --index-url $$u; done) \
	    $$(for l in $$fl; do echo --find-links $$l; done) $$(for u in $$ei; do echo --extra-index-url $$u; done) \
	    $(1) ); then :; \
	else echo "installing with pip (uv missing or failed)"; $(BIN)/pip install --quiet $(1); fi

# What the bench targets install; a variable because a comma inside $(call ...) splits arguments.
WITH_BENCH := -e '.[test,bench]'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet 'uv==0.13.9' || echo "uv not installable here: installing with pip (slower)"
	$(call PIP_INSTALL,-e '.[test]')
	touch $(STAMP)

install: $(STAMP)

# A DVC repository needs git; a tarball checkout gets one so `dvc repro` works too.
.git/HEAD:
	git init -q

.dvc/config: | .git/HEAD
	$(BIN)/dvc init -q
	$(BIN)/dvc config core.analytics false

run: $(STAMP) .dvc/config
	@start=$$(date +%s); \
	$(BIN)/bvpo run; status=$$?; \
	echo "make run: $$(( $$(date +%s) - start ))s for the pipeline"; exit $$status

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

repro: $(STAMP)
	$(BIN)/dvc repro

# DVC experiments start from a git commit (a fresh clone has one).
experiment: $(STAMP) .dvc/config
	@start=$$(date +%s); \
	$(BIN)/bvpo experiment $(if $(TASK),--task $(TASK)); status=$$?; \
	echo "make experiment: $$(( $$(date +%s) - start ))s"; exit $$status

ui: $(STAMP)
	$(BIN)/bvpo ui

# One machine: a loopback Prefect server and the round flow served on a schedule; Ctrl-C stops both.
CRON ?= 0 3 * * *
serve: $(STAMP) .dvc/config
	$(BIN)/bvpo serve --cron "$(CRON)"

# Team mode (README "Team mode"): the shared servers on this machine; `bvpo stack up --help` for
# ports, a data directory, a managed PostgreSQL or an object store for artifacts.
stack-up: $(STAMP) .dvc/config
	$(BIN)/bvpo stack up

stack-down: $(STAMP)
	$(BIN)/bvpo stack down

stack-status: $(STAMP)
	$(BIN)/bvpo stack status

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

# The trainer against TRL's DPOTrainer (installs the optional `bench` extra: trl==1.16.0).
bench-trl: $(STAMP)
	$(call PIP_INSTALL,$(WITH_BENCH))
	$(BIN)/python benchmarks/trl_compare.py

# The wheels a GPU node without a package index lacks (benchmarks/gpu_kit.py), into .whl/: the
# walk reads the installed metadata, so the `bench` extra (trl) is installed first.
# GPU_KIT_ARGS: build's options, e.g. GPU_KIT_ARGS="--python-version 3.11 --image freeze.txt".
GPU_KIT_ARGS ?=
gpu-kit: $(STAMP)
	$(call PIP_INSTALL,$(WITH_BENCH))
	$(BIN)/python benchmarks/gpu_kit.py build $(GPU_KIT_ARGS)

clean:
	rm -rf data/prompts data/base_model data/policy data/samples data/pairs data/models data/eval_prompts.json \
		.prefect .hf
