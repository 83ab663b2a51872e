# `make demo` and `make test` each create .venv when missing and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Local Ray instances bind to 127.0.0.1 only (Linux): no port opens to the network.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install demo test test-all lint clean benchmark benchmark-ablation benchmark-compare fashion-mnist-data

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,autoattack]'
	touch $@

# The embedded digits data, end to end through the platform: a search (12 GACD trials, TPE,
# ASHA) on a local Ray instance bound to 127.0.0.1, then its ablation (9 variants x 3 seeds,
# test split), every run in MLflow under runs/demo/. About 6 minutes on 2 CPUs.
DEMO := runs/demo
DEMO_ARGS := --storage $(DEMO)/ray_results --tracking-uri sqlite:///$(CURDIR)/$(DEMO)/mlflow.db
demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/python -m study.run search_spaces/digits.yaml $(DEMO_ARGS)
	$(BIN)/python -m study.run search_spaces/digits_ablation.yaml $(DEMO_ARGS)

# The paper's experiments on Fashion-MNIST (search_spaces/fashion_mnist*.yaml, figures in
# docs/benchmarks/fashion_mnist.md). BUDGET=cpu (default: 2 CPU cores; measured: benchmark 76
# minutes, benchmark-ablation 76, benchmark-compare 111 from a fresh clone) or BUDGET=full (the whole training set, 30 epochs, every test image, a quarter of a
# GPU per trial). An interrupted target continues where it stopped when run again.
BUDGET ?= cpu
BENCH := runs/benchmark-$(BUDGET)
BENCH_ARGS := --budget $(BUDGET) --storage $(BENCH)/ray_results \
	--tracking-uri sqlite:///$(CURDIR)/$(BENCH)/mlflow.db
resume = $(if $(wildcard $(BENCH)/ray_results/$(1)/gacd_study.json),--resume,)
FASHION_DEB := /usr/share/datasets/fashion-mnist
benchmark: install fashion-mnist-data
	mkdir -p $(BENCH)
	$(BIN)/python -m study.run search_spaces/fashion_mnist_baselines.yaml $(BENCH_ARGS) \
		$(call resume,fashion_mnist_baselines)

benchmark-ablation: install fashion-mnist-data
	mkdir -p $(BENCH)
	$(BIN)/python -m study.run search_spaces/fashion_mnist.yaml $(BENCH_ARGS) \
		$(call resume,fashion_mnist_search)
	$(BIN)/python -m study.run search_spaces/fashion_mnist_ablation.yaml $(BENCH_ARGS) \
		$(call resume,fashion_mnist_ablation)
	$(BIN)/python -m study.run search_spaces/fashion_mnist_negatives_confirm.yaml $(BENCH_ARGS) \
		$(call resume,fashion_mnist_negatives_confirm)

# Every method tuned with the same budget, then compared over fresh seeds (the same teacher,
# data and attack budget as `make benchmark`: its table and this one read side by side).
# CONFIRM_SEEDS="1000 1001 1002" and FINAL_SEEDS="0 1 2 3 4" add seeds to a comparison that
# ran: only what they add runs (README, "More seeds later").
CONFIRM_SEEDS ?=
FINAL_SEEDS ?=
benchmark-compare: install fashion-mnist-data
	mkdir -p $(BENCH)
	$(BIN)/python -m study.run search_spaces/fashion_mnist_compare.yaml $(BENCH_ARGS) \
		$(call resume,fashion_mnist_compare) \
		$(if $(CONFIRM_SEEDS),--confirm-seeds $(CONFIRM_SEEDS)) \
		$(if $(FINAL_SEEDS),--final-seeds $(FINAL_SEEDS))

# Fashion-MNIST's idx files: in data/ already, or Debian's package (installed here when this
# runs as root with apt-get), or a message saying what to run.
fashion-mnist-data:
	@if [ -d $(FASHION_DEB) ] || ls data/FashionMNIST/raw/train-images-idx3-ubyte* >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y dataset-fashion-mnist || \
		(apt-get update && apt-get install -y dataset-fashion-mnist); \
	else \
		echo "Fashion-MNIST is not here: run 'sudo apt-get install dataset-fashion-mnist'" \
			"(Debian, Ubuntu), or put its four idx files in data/FashionMNIST/raw/" >&2; \
		exit 2; \
	fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The tests but those marked slow (about 6 minutes on 2 CPUs, the install included; the CI
# smoke study on a real Ray cluster among them); every test, the slow ones too, is
# `make test-all` (about 25 minutes): what CI runs (.ci/run).
test: install lint
	$(BIN)/python -m pytest -m "not slow"

test-all: install lint
	$(BIN)/python -m pytest

clean:
	rm -rf runs ray_results mlflow.db optuna.db mlartifacts
