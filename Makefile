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

# The embedded digits data: a PGD-AT teacher, a natural student and a GACD student, each
# evaluated on the test split (clean, FGSM, PGD-20, CW-inf). About two minutes on 2 CPUs.
demo: install
	$(BIN)/python -m gacd.train configs/digits_teacher.yaml --out runs/digits_teacher
	$(BIN)/python -m gacd.train configs/digits_natural.yaml --out runs/digits_natural
	$(BIN)/python -m gacd.train configs/digits_gacd.yaml --out runs/digits_gacd \
		--set teacher.checkpoint=runs/digits_teacher/checkpoint.pt
	$(BIN)/python -m gacd.evaluate runs/digits_teacher/checkpoint.pt \
		runs/digits_natural/checkpoint.pt runs/digits_gacd/checkpoint.pt

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	$(BIN)/python -m pytest

clean:
	rm -rf runs ray_results mlflow.db
