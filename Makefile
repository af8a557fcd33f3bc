# Everyday tasks. `make run` starts the gate; `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: run test demo lint format bench settings-table system-deps js-deps install dev-install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements.txt | $(PY)
	$(PIP) install -r requirements.txt
	@touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(PY)
	$(PIP) install -r requirements-dev.txt
	@touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
dev-install: $(VENV)/.dev

## run: start the gate under gunicorn (gevent worker) with the settings in the environment
run: install
	$(VENV)/bin/gunicorn -c gunicorn.conf.py 'app:create_app()'

## test: install what the tests need (venv, redis-server, nginx, chromium, ollama-js), lint, run the suite
## in parallel (TEST_WORKERS pytest-xdist workers: most tests wait on sockets, not on the CPU).
## The suite writes bytecode even where PYTHONDONTWRITEBYTECODE is set, and compiles (and
## assertion-rewrites) the modules once before the workers start (tests/conftest.py), so that
## the workers and the gates they start load compiled modules instead of each compiling them.
TEST_WORKERS ?= 6
test: dev-install system-deps js-deps lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

## demo: the gate in front of two simulated Ollama backends, with some load, on GATE_BIND (default 127.0.0.1:8000)
demo: dev-install
	$(PY) scripts/demo.py

## lint: ruff (lint + format check) and mypy
lint: dev-install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: dev-install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## settings-table: regenerate the README's settings table from the declarations in settings.py
settings-table: install
	$(PY) -m settings --update-readme README.md

## bench: the benchmarks of docs/BENCHMARKS.md
bench: dev-install
	@bash scripts/system-deps.sh bench
	$(PY) bench/proxy_overhead.py

system-deps:
	@bash scripts/system-deps.sh

js-deps: tests/js/node_modules/.installed

tests/js/node_modules/.installed: tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

clean:
	rm -rf $(VENV) tests/js/node_modules .pytest_cache .mypy_cache .ruff_cache
