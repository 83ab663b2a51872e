# `make demo` and `make test` each create .venv when missing and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Local Ray instances bind to 127.0.0.1 only (Linux): no port opens to the network.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,autoattack]'
	touch $@

# The embedded digits data, end to end through the platform: a search (12 GACD trials, TPE,
# ASHA) on a local Ray instance bound to 127.0.0.1, then its ablation (9 variants x 3 seeds,
# test split), every run in MLflow under runs/demo/. About 7 minutes on 2 CPUs.
DEMO := runs/demo
DEMO_ARGS := --storage $(DEMO)/ray_results --tracking-uri sqlite:///$(CURDIR)/$(DEMO)/mlflow.db
demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/python -m study.run search_spaces/digits.yaml $(DEMO_ARGS)
	$(BIN)/python -m study.run search_spaces/digits_ablation.yaml $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	$(BIN)/python -m pytest

clean:
	rm -rf runs ray_results mlflow.db optuna.db mlartifacts
