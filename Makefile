# Every target sets up what it needs, so a fresh machine runs `make demo` or `make test` directly.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned so pip never swaps in a different (multi-GB CUDA) build;
# on this project's CI machines torch==2.13.0 is a local CPU wheel.
TORCH_SPEC ?= torch==2.13.0
# The versions of every other dependency the test suite last passed with (`make lock` rewrites it), so a fresh
# machine installs what was tested, not whatever was released since.
CONSTRAINTS := constraints.txt
# `make test-latest` builds this one from the newest releases instead, to see an upstream change the day it ships.
VENV_LATEST := .venv-latest

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --constraint $(CONSTRAINTS) -e ".[test]"
	$(PY) -m pip install --quiet --no-deps --constraint $(CONSTRAINTS) timm
	touch $@

.PHONY: install demo test bench lock test-latest browser
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/visualrwkv demo

# tests/test_web.py drives the web app in headless Chromium: installed from Debian's packages when missing, as root
# with apt-get; anywhere else (or if the install fails) those tests skip, saying why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing chromium and chromium-driver for the browser tests (apt-get)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
	    >/dev/null || echo "Could not install chromium: the browser tests will skip"; \
	else echo "No chromium/chromedriver, and not root with apt-get to install them: the browser tests will skip"; fi

test: $(VENV)/.installed browser
	$(PY) -m pytest tests

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --constraint $(CONSTRAINTS) -e ".[test,bench]"
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) benchmarks/bench_rwkv6_lm.py

# Record what .venv holds (run after `make test` passes); torch stays with TORCH_SPEC, which picks the build.
lock: $(VENV)/.bench-installed
	{ echo "# Written by make lock from a .venv that passed make test; make install uses it as pip constraints."; \
	  $(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-[a-z0-9-]+) ?(==|@)'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

# The whole suite against the newest release of every dependency but torch (upgraded on each run).
test-latest: browser
	$(PYTHON) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_LATEST)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VENV_LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]"
	$(VENV_LATEST)/bin/python -m pip list --format freeze | grep -iE '^(transformers|tokenizers|peft|accelerate|kernels|huggingface.hub|safetensors)=='
	$(VENV_LATEST)/bin/python -m pytest tests
