# Two commands for a new user: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean bench

setup: $(STAMP)

# torch==2.13.0 is installed only when torch is missing, so a user's own (GPU) build is kept. TorchRec and the
# FBGEMM CPU build that loads with that torch come for tests/test_sharded.py (a pip extra cannot say --no-deps:
# TorchRec asks for the CUDA build of FBGEMM).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is not None or not torch.__version__.startswith('2.13.'))" \
		&& $(BIN)/python -m pip install -q --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0 \
		&& $(BIN)/python -m pip install -q tensordict "torchmetrics==1.0.3" pyre-extensions tqdm \
		|| echo "TorchRec for CPUs is installed only beside torch 2.13 (CPU): tests/test_sharded.py will skip"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m ctrkit.demo

test: setup
	$(BIN)/python -m pytest -n 2 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
