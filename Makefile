# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY ?= python3
UV := $(PY) -m uv
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export UV_PROJECT_ENVIRONMENT := $(VENV)
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export YOLO_OFFLINE := 1
export MPLBACKEND := Agg
PYTEST_ARGS ?=

.PHONY: help env demo test lint format repro ui clean

help:
	@echo "make demo   - create .venv from uv.lock, pull data, run the whole pipeline (dvc repro)"
	@echo "make test   - lint and run the fast test suite (no GPU, no slow tests)"
	@echo "make ui     - open the MLflow UI on the demo's runs"

# uv from PyPI when missing, then the exact environment from the committed lock.
$(VENV)/.synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || $(PY) -m pip install --quiet "uv>=0.5"
	$(UV) sync --frozen
	@touch $@

env: $(VENV)/.synced

demo: env
	dvc pull --quiet data.dvc
	dvc repro
	microseg where

test: env lint
	dvc pull --quiet data.dvc
	pytest -m "not slow and not gpu" $(PYTEST_ARGS)

lint: env
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks

format: env
	ruff check --fix src tests benchmarks
	ruff format src tests benchmarks

repro: env
	dvc repro

ui: env
	mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean:
	rm -rf data/prepared data/synthetic reports metrics mlruns mlflow.db .pytest_cache
