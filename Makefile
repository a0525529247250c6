# Two commands for a new user: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean bench

setup: $(STAMP)

# torch==2.13.0 is installed only when torch is missing, so a user's own (GPU) build is kept.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m ctrkit.demo

test: setup
	$(BIN)/python -m pytest -n 2 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
