# longctx: `make demo` and `make test` are the two commands a fresh machine needs.
# `make setup` builds .venv; on a machine without an NVIDIA GPU it installs the CPU build of torch
# first, so pip never pulls a multi-GB CUDA build. Set TORCH_INDEX to a wheel index
# (e.g. https://download.pytorch.org/whl/cpu) where PyPI's default torch is a CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
DEMO_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench lint clean aot gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the default (CUDA) torch build"; \
	else \
		echo "No GPU: installing the CPU build of torch ($(TORCH_SPEC))"; \
		$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Two pytest-xdist workers, one test file per worker at a time (module fixtures stay in one process);
# PYTEST_WORKERS=0 runs everything in one process (docs/testing.md).
PYTEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q --durations=15 -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Pretrain (killed and resumed once), needle eval at L and 2L, continue-train at 2L, eval, summary.
demo: setup
	$(PY) -m longctx.demo $(DEMO_ARGS)

bench: setup
	$(VENV)/bin/longctx bench comm

# Compile every kernel and tuning config for sm_80 and sm_90 without a GPU (docs/kernels.md).
aot: setup
	$(PY) -m longctx.kernels.aot

# On a GPU machine, with its own python3 (no venv, no install): longctx check, the GPU tests, the
# 16k/64k kernel benchmarks into bench/results/, the README targets table (docs/kernels.md).
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m longctx.bench.gpu_check

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
