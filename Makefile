# Quick start (fresh machine, Python 3.11+):
#   make pipeline    # venv + install, then the whole DVC pipeline on real MNIST
#   make test        # venv + install, then the test suite (not the slow tests)
# Both are idempotent: the venv is built once and rebuilt only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Offline copy of MNIST beside the checkout when present; otherwise the public mirrors.
MNIST_SOURCE ?= $(if $(wildcard ../shared/mnist/train-images-idx3-ubyte.gz),$(abspath ../shared/mnist),)
PROFILE ?= default
RUN := env PATH="$(abspath $(BIN)):$$PATH" $(if $(MNIST_SOURCE),MNIST_SOURCE="$(MNIST_SOURCE)",)

.PHONY: install pipeline params remotes pipeline-quick gate test test-slow test-all lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python -e '.[pipeline,dev]'
	touch $(STAMP)

install: $(STAMP)

# `dvc exp run -S profile=X` composes params.yaml from conf/ (Hydra) with the profile's
# real values, then runs only what is stale; the gate stage fails the run on a rejected
# model. A failed or refused run puts params.yaml back as it was.
pipeline: install
	$(RUN) $(BIN)/python -m pipeline.core.profiles exp-run profile=$(PROFILE)

# Regenerate params.yaml from conf/ after editing conf/ (the default profile).
params: install
	$(BIN)/python -m pipeline.core.profiles compose

pipeline-quick:
	$(MAKE) pipeline PROFILE=quick

# Are the git and DVC remotes configured and reachable? Says what to configure if not.
remotes: install
	$(RUN) $(BIN)/python -m pipeline remotes

# The gate alone, as a CI check on the current candidate (exits non-zero on rejection).
gate: install
	$(RUN) $(BIN)/python -m pipeline gate

test: install
	$(RUN) $(BIN)/pytest -m "not slow"

test-slow: install
	$(RUN) $(BIN)/pytest -m slow

test-all: install
	$(RUN) $(BIN)/pytest

lint: install
	$(BIN)/python -m pipeline.core.profiles check
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
