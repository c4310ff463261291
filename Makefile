# One entry point per thing a person does. `make help` lists them.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
PROFILE ?= quick

.PHONY: help setup data run study test lint clean-outputs

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

$(BIN)/fer: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

setup: $(BIN)/fer  ## create .venv and install the project (about 2 minutes)

data: setup  ## fetch the raw FER-2013 images from the team's DVC remote
	$(BIN)/dvc pull data/raw/fer2013.dvc

run: setup  ## set up and run the whole pipeline with the quick profile (CPU, < 20 min)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/fer run --profile $(PROFILE)

study: setup  ## the original study's full recipe (params.yaml defaults; a GPU job)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro --pull

test: setup  ## the test suite (real DVC, GX, MLflow and Prefect servers; tiny synthetic data)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

lint: setup  ## ruff
	$(BIN)/ruff check src flows tests benchmarks
