# rexec: developer and CI entry points. GNU make; needs only python3 (3.11+) on a fresh machine.
# Everything runs from .venv/bin, so no virtualenv needs to be activated.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules --no-print-directory

# python3.11 where there is one, else python3 (pyproject asks for 3.11 or newer).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Rebuilt whenever pyproject.toml changes; lives inside the venv, so `clean` removes it too.
STAMP := $(VENV)/.rexec-installed

# Only the folders that exist (an empty folder is not in a fresh clone).
CODE_DIRS := $(wildcard schemas dispatcher worker client tests demo bench)
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: help venv services lint typecheck test pytest demo format clean

help: ## list the targets
	@echo "rexec: make <target>"
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "variables: PYTHON=$(PYTHON) VENV=$(VENV) PYTEST_WORKERS=$(PYTEST_WORKERS) PYTEST_ARGS=..."

venv: $(STAMP) ## create .venv and install rexec with its dev tools (fast when up to date)

$(STAMP): pyproject.toml
	@if [ -z '$(PYTHON)' ]; then echo "no python3 on PATH: install Python 3.11 (Debian: apt-get install -y python3 python3-venv)" >&2; exit 1; fi
	@if ! $(BIN)/python -c '' 2>/dev/null; then \
		echo "creating $(VENV) with $(PYTHON)"; \
		rm -rf '$(VENV)'; \
		$(PYTHON) -m venv '$(VENV)'; \
	fi
	$(BIN)/python -m pip install -qq --disable-pip-version-check -e '.[dev]'
	@touch '$@'

services: ## check RabbitMQ, Redis and PostgreSQL answer; start any that is installed but stopped
	@bash scripts/services.sh

lint: venv ## ruff format --check and ruff check
	@rc=0; \
	$(BIN)/ruff format --check $(CODE_DIRS) || rc=1; \
	$(BIN)/ruff check $(CODE_DIRS) || rc=1; \
	exit $$rc

typecheck: venv ## mypy --strict on the packages listed in pyproject's [tool.mypy]
	$(BIN)/mypy

test: venv services ## lint, typecheck, then the whole test suite against the real services
	@$(MAKE) lint
	@$(MAKE) typecheck
	@$(MAKE) pytest

# pytest exits 5 when it collected no tests: that is a failure too (make fails on any non-zero).
pytest: venv ## only the test suite (PYTEST_ARGS='-k name' to pick; services must be up)
	@rc=0; \
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; \
	exit $$rc

demo: venv services ## run the demo: a dispatcher, two agents, a few thousand tasks
	$(BIN)/python -m demo.run

format: venv ## ruff format and ruff check --fix
	$(BIN)/ruff format $(CODE_DIRS)
	$(BIN)/ruff check --fix $(CODE_DIRS)

clean: ## remove .venv, caches and SQLite files
	rm -rf '$(VENV)' .mypy_cache .ruff_cache .pytest_cache .demo
	find . -path ./.git -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -type d -prune -exec rm -rf {} +
	find . -path ./.git -prune -o -type f \( -name '*.db' -o -name '*.db-wal' -o -name '*.db-shm' \) -exec rm -f {} +
