# The two quickstart commands (README): `make demo` and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

# constraints.txt pins every package to the versions the demo's numbers were measured with.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

.PHONY: install demo test lint
install: $(VENV)/.installed

# The full demo (3 seeds, about 6 minutes on 2 CPU cores); `longkd demo --quick` is 1 seed.
# It pins the CPU code paths itself before torch loads (tools/demo.py, CPU_NUMERICS).
demo: install
	$(VENV)/bin/longkd demo

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -q --timeout=900
