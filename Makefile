# Two entry points for a fresh machine (both idempotent, both build their own virtualenv):
#   make run   — set up, fill data/ from the synthetic city if empty, run the Prefect flow train-all
#                end to end (embedded local API), print the results table
#   make test  — set up, lint (ruff check + ruff format --check), run the test suite
# Orchestration: `make up` (local Prefect API + UI, SQLite, and serve: train-all/train-all and the scheduled
# reindex/reindex; `make down` stops both), or `make server` and `make serve` in two shells;
# `make repro` runs the same steps via DVC;
# `make study` reproduces docs/results (demo + ablations); `make cpu-study` runs the longer CPU profile.
# `make api` serves the live release over HTTP (page at http://127.0.0.1:8000/, docs at /docs).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PYTHONUNBUFFERED := 1
# Prefect's database, cache records and results stay inside the project (.prefect/, gitignored);
# not exported, so the test suite keeps its own temporary PREFECT_HOME
PREFECT_HOME ?= $(abspath .prefect)
PREFECT_PORT ?= 4200

.PHONY: setup run test data repro bench clean server serve up down api browser study cpu-study ablations

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

run: data
	PREFECT_HOME=$(PREFECT_HOME) PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 $(BIN)/python -m flows.train_all

# The whole reproduction (docs/results/): the demo's head table on both test sets, then every ablation.
study: run ablations

# The longer CPU head comparison (profiles/cpu-study.yaml: each head up to 36 epochs; its duration:
# README) via DVC; it rewrites params.yaml, and `vpr profile cpu` switches it back to the demo.
cpu-study: $(STAMP)
	$(BIN)/vpr profile cpu-study
	$(MAKE) repro

# Every ablation of the study (params.yaml `ablation`: budget, seeds), run, tabled and plotted with the
# findings page in docs/results/ablations/ (README there: how long it takes here)
ablations: data
	dvc repro shard test-set
	$(BIN)/vpr ablation study

server: $(STAMP)
	PREFECT_HOME=$(PREFECT_HOME) $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

serve: $(STAMP)
	PREFECT_HOME=$(PREFECT_HOME) PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/python -m flows.serve

# server, then serve once the API answers, each in a process group of its own (flows/up.py); Ctrl-C, a
# SIGTERM to make, or `make down` from another shell stops both and everything they started
up: $(STAMP)
	exec env PREFECT_HOME=$(PREFECT_HOME) $(BIN)/python -m flows.up --host 127.0.0.1 --port $(PREFECT_PORT)

# stops what `make up` started (its PID and process groups are in $(PREFECT_HOME)/up.json)
down:
	PREFECT_HOME=$(PREFECT_HOME) $(BIN)/python -m flows.up --down

api: $(STAMP)
	$(BIN)/vpr api

# The page test drives the system's Chromium (Debian's package; Playwright never downloads a browser)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "installing Chromium from Debian's packages (for the page test)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium \
	  || echo "Chromium could not be installed: tests/test_page.py will be skipped"; }

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/mining.py

clean:
	rm -rf artifacts metrics reports
