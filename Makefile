# Every target sets up what it needs, so a fresh machine runs `make demo` or `make test` directly.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned so pip never swaps in a different (multi-GB CUDA) build;
# on this project's CI machines torch==2.13.0 is a local CPU wheel.
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: install demo test bench
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/visualrwkv demo

test: $(VENV)/.installed
	$(PY) -m pytest tests

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) benchmarks/bench_rwkv6_lm.py
