# Two commands do everything: `make demo` (main job, offline) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= $(abspath ../shared)
export AGNEWS_DATA ?= $(SHARED)/data/ag_news
export BASE_MODEL ?= $(SHARED)/models/all-MiniLM-L6-v2
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast lint demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

setup: $(BIN)/python
	scripts/install.sh $(BIN)/python dev,ray

test: $(BIN)/python
	@[ -x $(BIN)/pytest ] || $(MAKE) setup
	$(BIN)/pytest -q -rs

test-fast:
	$(BIN)/pytest -q -m "not slow"

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo:
	@[ -x $(BIN)/pytest ] || $(MAKE) setup
	$(BIN)/python -m benchmarks demo

clean:
	rm -rf store runs reports/*.json .pytest_cache
