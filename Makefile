# Two set-up commands: `make run` (install + run the default sweep) and `make test` (install + tests + CI job).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
ROOT := $(CURDIR)/data
export SAE_PIPELINE_ROOT ?= $(ROOT)
export DAGSTER_HOME ?= $(ROOT)/dagster_home
CI_ROOT := $(CURDIR)/data/ci
CI_SWEEP := data/sweeps/ci.yaml
# the CI job runs with both trackers on, offline (W&B run folders, an MLflow file store), then checks what they hold
CI_MLFLOW := file://$(CI_ROOT)/mlruns
CI_TRACKING := SAE_PIPELINE_TRACKING=wandb,mlflow WANDB_MODE=offline WANDB_SILENT=true WANDB_DIR=$(CI_ROOT)/tracking \
  MLFLOW_TRACKING_URI=$(CI_MLFLOW) MLFLOW_ALLOW_FILE_STORE=true

.PHONY: install install-test run test ui lint clean

$(VENV)/bin/activate:
	python3.11 -m venv $(VENV)

# torch==2.13.0 resolves to the CPU wheel on this machine's disk; see README for a CUDA build.
install: $(VENV)/bin/activate
	$(PIP) install --quiet -c constraints.txt -e .

install-test: $(VENV)/bin/activate
	$(PIP) install --quiet -c constraints.txt -e '.[test]'

run: install
	$(VENV)/bin/sae-pipeline run-sweep data/sweeps/default.yaml

test: install-test
	$(VENV)/bin/ruff check sae_pipeline sae_pipeline_tests
	@# the browser tests (the dashboard's, the Dagster UI's) need Debian's chromium; without it they skip with the reason
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || echo "chromium could not be installed"
	$(VENV)/bin/pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc
	$(VENV)/bin/dagster definitions validate -m sae_pipeline.definitions
	rm -rf $(CI_ROOT) && mkdir -p $(CI_ROOT)/dagster_home
	export SAE_PIPELINE_ROOT=$(CI_ROOT) DAGSTER_HOME=$(CI_ROOT)/dagster_home $(CI_TRACKING) && \
	  key=$$($(VENV)/bin/sae-pipeline register-sweep $(CI_SWEEP) | head -n 1) && \
	  $(VENV)/bin/dagster job execute -m sae_pipeline.definitions -j ci_smoke -c data/sweeps/ci_run_config.yaml \
	    --tags "{\"dagster/partition\": \"$$key\"}" && \
	  $(PY) -m sae_pipeline_tests.tracking_records $(CI_ROOT) $(CI_MLFLOW) ci $(CI_ROOT)/tracking

ui: install
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

lint: install-test
	$(VENV)/bin/ruff check sae_pipeline sae_pipeline_tests

clean:
	rm -rf data/corpus data/activations data/sae data/checkpoints data/features data/feature_labels \
	  data/sweep_analysis data/configs data/ci
