# dsv4 developer entry points. `make install` once, then `make demo` / `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test test-fast test-gpu lint fmt bench clean

$(BIN)/dsv4:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==$(TORCH_VERSION)
	$(BIN)/pip install -e ".[dev]"

install: $(BIN)/dsv4

demo: $(BIN)/dsv4
	$(BIN)/dsv4 chat --mode think-high --show-thinking -p "What is 487 + 356?"

test: $(BIN)/dsv4
	$(BIN)/python -m pytest -q

test-gpu: $(BIN)/dsv4
	$(BIN)/python -m pytest -q -m gpu

lint: $(BIN)/dsv4
	$(BIN)/ruff check src tests benchmarks tools

fmt: $(BIN)/dsv4
	$(BIN)/ruff check --fix src tests benchmarks tools

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
