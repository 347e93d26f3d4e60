# Two entry points (README): `make demo` and `make test`. Both set up .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU build by default; on a GPU box install your CUDA build of torch into .venv first.
TORCH ?= torch==2.13.0
VALIDATOR := tests/gltf_validator

.PHONY: setup setup-test demo test test-fast lint clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime pyproject.toml $(VALIDATOR)/package-lock.json
	$(PY) -m pip install -q -e ".[test]"
	npm ci --prefix $(VALIDATOR) --no-audit --no-fund --silent
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

demo: setup
	$(PY) -m backend info
	$(PY) -m backend demo --out out/demo

# Everything, slow end-to-end tests included: what CI runs.
test: setup-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest --run-slow

# The quick loop while developing: slow tests skipped.
test-fast: setup-test
	$(PY) -m pytest

lint: setup-test
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) out $(VALIDATOR)/node_modules
