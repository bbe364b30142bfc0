# One command to run the stack, one to test it. Both set themselves up on a
# fresh machine: a virtualenv in .venv with the pinned requirements.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=

.PHONY: help run test lint unit js system format bench build clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.runtime: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt
	@touch $@

# The project itself, editable, so the console scripts (latency-gateway,
# latency-viewer) exist in the venv for the tests that run them as users do.
$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt pyproject.toml
	$(PIP) install -r requirements-dev.txt
	$(PIP) install --no-deps -e .
	@touch $@

run: $(VENV)/.runtime  ## start backend (:4567) and gateway (:8080); Ctrl-C stops both
	$(PY) scripts/run_stack.py

lint: $(VENV)/.dev  ## ruff, ruff format --check, mypy --strict
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy gateway viewer backend latency_common

# Real-browser and load-balancer tests drive Debian's chromium and nginx
# (never a downloaded binary).
system:  ## install Debian chromium and nginx-light when missing (needs root, as CI is)
	@missing=""; \
	  command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	  command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || missing="$$missing nginx-light"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian$$missing (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  fi

frontend-snippet/node_modules/.installed: frontend-snippet/package.json frontend-snippet/package-lock.json
	cd frontend-snippet && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# The page SDKs (OpenTelemetry web, Honeycomb) and esbuild for
# tests/test_coexistence.py, pinned by tests/pages/package-lock.json.
tests/pages/node_modules/.installed: tests/pages/package.json tests/pages/package-lock.json
	cd tests/pages && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

js: frontend-snippet/node_modules/.installed  ## the snippet's node tests, size check, npm builds (dist/) and types check
	node --test frontend-snippet/test/
	node frontend-snippet/scripts/size.mjs
	cd frontend-snippet && npm run --silent build && npm run --silent typecheck

unit: $(VENV)/.dev system tests/pages/node_modules/.installed  ## the Python test suite only (no lint)
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint js unit  ## lint + the snippet's tests + the whole Python suite (what CI runs)

bench: $(VENV)/.dev system frontend-snippet/node_modules/.installed  ## benchmarks (~12 min): writes benchmarks/RESULTS.md
	$(PY) benchmarks/run.py

# The package users install: gateway/, viewer/, latency_common/ and the snippet.
# (make unit checks it too: tests/test_packaging.py builds both, installs the
# wheel into a fresh virtualenv and runs its console scripts.)
build: $(VENV)/.dev  ## the wheel and sdist into dist/ (python -m build)
	$(PY) -m build --outdir dist .
# Not part of `make test`: mutmut over the pure and thin gateway modules, Stryker
# over the snippet; MUTATION_ARGS=--keep reuses mutmut's cache in ./mutants.
MUTATION_ARGS ?=
.PHONY: mutate
mutate: $(VENV)/.dev frontend-snippet/node_modules/.installed  ## mutation testing (~45 min): writes benchmarks/MUTATION.md
	$(PY) benchmarks/mutation.py $(MUTATION_ARGS)

format: $(VENV)/.dev  ## apply ruff's fixes and formatting
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:  ## remove the virtualenv, caches and dist/
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis dist build
