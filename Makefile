# Two commands for a fresh machine:  `make demo` and `make test`.
# Both create .venv, install torch first (TORCH, default the CPU-ready torch==2.13.0;
# on a CUDA machine set TORCH to the build you want), then shardgen with pinned versions.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch before anything that depends on it, so pip never pulls CUDA wheels onto a CPU machine
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	# An editable install of a mapped package prints a notice about same-named folders: shardgen has none.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/shardgen run

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) demo-output
