# Two entry points for a fresh machine (both idempotent, both build their own virtualenv):
#   make run   — set up, fill data/ from the synthetic city if empty, run the pipeline end to end
#   make test  — set up, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup run test data repro bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# data/ is DVC-tracked raw imagery; the synthetic city is deterministic, so it matches data.dvc.
data: $(STAMP)
	@test -d .git || (git init -q && echo "initialised a git repository (DVC needs one)")
	@if [ -z "$$(ls -A data 2>/dev/null)" ]; then \
	  (dvc pull -q data.dvc 2>/dev/null && echo "data/ pulled from the DVC cache") || \
	  (vpr synth data && echo "data/ rendered from the synthetic city"); \
	fi
	dvc add -q data

repro: data
	dvc repro

run: repro

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/mining.py

clean:
	rm -rf artifacts metrics reports
