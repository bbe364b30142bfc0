# One command to run the stack, one to test it. Both set themselves up on a
# fresh machine: a virtualenv in .venv with the pinned requirements.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=

.PHONY: help run test lint unit format bench clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.runtime: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt
	@touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) install -r requirements-dev.txt
	@touch $@

run: $(VENV)/.runtime  ## start backend (:4567) and gateway (:8080); Ctrl-C stops both
	$(PY) scripts/run_stack.py

lint: $(VENV)/.dev  ## ruff, ruff format --check, mypy --strict
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy gateway backend

unit: $(VENV)/.dev  ## the test suite only (no lint)
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint unit  ## lint + the whole test suite (what CI runs)

format: $(VENV)/.dev  ## apply ruff's fixes and formatting
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
