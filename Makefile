# One entry point per thing a person does. `make help` lists them.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
PROFILE ?= quick

.PHONY: help setup setup-unlocked lock setup-gpu data run study test test-all serve schemas lint clean-outputs

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

# The environment comes from the lock (requirements/linux-py311.txt), installed by uv: the same
# versions everywhere, in about a minute, with no resolver run. Another platform or Python:
# `make setup-unlocked` (pip resolves pyproject.toml's ranges).
LOCK := requirements/linux-py311.txt
UV_VERSION := 0.13.10

$(BIN)/fer: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip sync -q --python $(BIN)/python $(LOCK)
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	@touch $@

setup: $(BIN)/fer  ## create .venv from the lock file and install the project (about a minute)

setup-unlocked:  ## .venv resolved by pip from pyproject.toml's ranges (other platforms; minutes)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'

lock: setup  ## re-pin requirements/linux-py311.txt after editing pyproject.toml's dependencies
	$(BIN)/uv pip compile -q pyproject.toml --extra dev --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu --no-header -o $(LOCK).new
	{ head -3 $(LOCK); cat $(LOCK).new; } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK) && rm $(LOCK).new

data: setup  ## fetch the raw FER-2013 images from the team's DVC remote
	$(BIN)/dvc pull data/raw/fer2013.dvc

run: setup  ## set up and run the whole pipeline with the quick profile (2-core CPU, float32: 10-25 min)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/fer run --profile $(PROFILE)

study: setup  ## the original study's full recipe (params.yaml defaults; a GPU job)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro --pull

test: setup  ## the fast tier: every module on tiny synthetic data, no whole pipelines (about 4 min)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -m "not slow"

test-all: setup  ## everything (CI): + whole pipelines, Prefect/PostgreSQL/S3/git servers, a browser (about 26 min)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

serve: setup  ## fer serve: HTTP + web page on http://127.0.0.1:8000/ (the champion, else the bundled release)
	$(BIN)/fer serve

schemas: setup  ## regenerate docs/schemas/ (JSON Schemas; a test fails when they are stale)
	$(BIN)/fer schemas

lint: setup  ## ruff
	$(BIN)/ruff check src flows tests benchmarks experiments

# ---- orchestration: Prefect flow + servers (docs/orchestration.md) ----
# Servers bind to HOST; point at a team's servers with PREFECT_API_URL / MLFLOW_TRACKING_URI.
HOST            ?= 127.0.0.1
MLFLOW_PORT     ?= 5000
PREFECT_PORT    ?= 4200
GPUS            ?= 1
PREFECT_HOME    ?= $(abspath .prefect)
PREFECT_API_URL ?= http://$(HOST):$(PREFECT_PORT)/api
PREFECT_ENV = PREFECT_HOME="$(PREFECT_HOME)" PREFECT_API_URL="$(PREFECT_API_URL)" \
	PREFECT_SERVER_ANALYTICS_ENABLED=false PATH="$(abspath $(BIN)):$$PATH"

.PHONY: mlflow-server prefect-server worker deploy trigger flow demo-workers test-flows

mlflow-server: setup  ## MLflow server on HOST:5000 (SQLite mlflow.db, artifacts in mlartifacts/)
	$(BIN)/mlflow server --backend-store-uri sqlite:///mlflow.db --artifacts-destination ./mlartifacts \
		--host $(HOST) --port $(MLFLOW_PORT)

prefect-server: setup  ## Prefect server + UI on HOST:4200 (state in .prefect/)
	$(PREFECT_ENV) $(BIN)/prefect server start --host $(HOST) --port $(PREFECT_PORT)

worker: setup  ## a worker of pool gpu: states its devices, refuses without a GPU (QUEUE=train LIMIT=1 ALLOW_NO_GPU=1)
	$(PREFECT_ENV) $(BIN)/fer worker --pool gpu $(if $(QUEUE),--queue $(QUEUE)) \
		$(if $(LIMIT),--limit $(LIMIT)) $(if $(ALLOW_NO_GPU),--allow-no-gpu)

setup-gpu: setup  ## add the GPU extra (JAX with CUDA 12) to .venv: for workers of pool gpu (then KERAS_BACKEND=jax)
	$(BIN)/pip install -q -e '.[gpu]'

deploy: setup  ## register prefect.yaml's deployments (nightly 02:00 UTC + on-demand, pool gpu; GPUS=N; workers clone FER_GIT_REPOSITORY@FER_GIT_BRANCH)
	$(PREFECT_ENV) $(BIN)/python flows/deploy.py --gpus $(GPUS)

trigger: setup  ## run fer-pipeline/on-demand now (ARGS='-p epochs=1 -p dispatch=workers')
	$(PREFECT_ENV) $(BIN)/prefect deployment run fer-pipeline/on-demand $(ARGS)

flow: setup  ## run the flow here without a worker (ARGS='--epochs 1 -S data.max_per_class=200')
	PREFECT_HOME="$(PREFECT_HOME)" PREFECT_SERVER_ANALYTICS_ENABLED=false PATH="$(abspath $(BIN)):$$PATH" \
		$(if $(filter command line environment,$(origin PREFECT_API_URL)),PREFECT_API_URL="$(PREFECT_API_URL)") \
		$(BIN)/python flows/pipeline.py $(ARGS)

demo-workers: setup  ## a parent + two worker machines, own roots, sharing only git/S3/PostgreSQL/Prefect; one killed mid-training (~4 min)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/flows/test_scale_out.py

test-flows: setup  ## the orchestration tests only (real Prefect server + worker, ~3 min)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q tests/flows

# ---- team stores: PostgreSQL + S3 + MLflow server, as a team shares them (docs/team-stores.md) ----
# The same code the tests start the stack with (tests/team_stack.py). Binds 127.0.0.1 only.
TEAM_STACK ?= .team-stack
TEAM_ENV = PATH="$(abspath $(BIN)):$$PATH" PYTHONPATH=tests

.PHONY: team-stack team-stack-stop test-team-stores

team-stack: setup  ## PostgreSQL + S3 (moto) + MLflow server (port MLFLOW_PORT) on 127.0.0.1, state in .team-stack/; prints the exports
	$(TEAM_ENV) $(BIN)/python -m team_stack up --dir $(TEAM_STACK) --mlflow-port $(MLFLOW_PORT)

team-stack-stop:  ## stop make team-stack's servers (its database and in-memory buckets go with them)
	$(TEAM_ENV) $(BIN)/python -m team_stack down --dir $(TEAM_STACK)

test-team-stores: setup  ## the team-stores test only (real PostgreSQL, S3, MLflow server; ~2.5 min)
	$(TEAM_ENV) $(BIN)/python -m pytest -q tests/test_team_stores.py
