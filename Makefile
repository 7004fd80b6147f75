# The two commands of the README: `make demo` and `make test`. Both create .venv and install
# omni-ds into it first (see README, "Picking a torch build", to choose another torch).
SHELL := bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch only, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.omni-ds-installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install test lint format demo clean

$(STAMP): pyproject.toml Makefile constraints.txt
	@start=$$(date +%s); \
	test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	{ echo "torch==$(TORCH_VERSION)"; grep -v "^#" constraints.txt; } > $(VENV)/constraints.txt; \
	$(PIP) "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS) && \
	$(PIP) -c $(VENV)/constraints.txt "setuptools>=68" wheel ninja && \
	$(PIP) -c $(VENV)/constraints.txt --no-build-isolation "deepspeed==0.19.8" && \
	$(PIP) -c $(VENV)/constraints.txt -e ".[test]" && \
	touch $@ && echo "omni-ds installed into $(VENV) in $$(( $$(date +%s) - start )) s"

install: $(STAMP)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

# Stages already finished under runs/demo are reused; DEMO_ARGS=--force reruns them all.
DEMO_ARGS ?=
demo: install
	$(VENV)/bin/omni-ds demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
