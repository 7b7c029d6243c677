# The two quickstart commands (README): `make demo` and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: install demo test lint
install: $(VENV)/.installed

# The full demo (3 seeds, about 6 minutes on 2 CPU cores); `longkd demo --quick` is 1 seed.
demo: install
	$(VENV)/bin/longkd demo

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -q --timeout=900
