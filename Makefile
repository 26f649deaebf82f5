# dsv4 developer entry points. `make install` once, then `make demo` / `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test test-gpu lint fmt clean gpu-wheels gpu-check gpu-check-dry

$(BIN)/dsv4:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==$(TORCH_VERSION)
	$(BIN)/pip install -e ".[dev]"

install: $(BIN)/dsv4

demo: $(BIN)/dsv4
	$(BIN)/dsv4 chat --mode think-high --show-thinking -p "What is 487 + 356?"

# Test files spread over up to 4 worker processes (pytest-xdist; one per core, so 2 on the 2-core CI machine):
# whole files per worker, so the module-scoped fixtures (the GPU-check dry run, built models) run once.
test: $(BIN)/dsv4
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

test-gpu: $(BIN)/dsv4
	$(BIN)/python -m pytest -q -m gpu

# The prepared GPU check (docs/gpu-check.md). gpu-wheels downloads, for the device's Python, every package dsv4
# and `pytest -m gpu` need except torch/triton/nvidia-* into $(GPU_WHEELS) (ignored: build/), to carry to a
# device that reaches no registry; the check installs only the ones that device lacks.
GPU_PYTHON ?= 3.12
GPU_WHEELS ?= build/gpu-wheels
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
	manylinux1_x86_64

gpu-wheels: $(BIN)/dsv4
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(BIN)/python benchmarks/gpu_check.py --requirements > $(GPU_WHEELS)/requirements.txt
	$(BIN)/pip download -q --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -d $(GPU_WHEELS) -r $(GPU_WHEELS)/requirements.txt
	$(BIN)/python benchmarks/gpu_check.py --check-wheels $(GPU_WHEELS) --device-python $(GPU_PYTHON)

gpu-check: $(BIN)/dsv4
	$(BIN)/python benchmarks/gpu_check.py --out build/gpu-check --wheels $(GPU_WHEELS)

gpu-check-dry: $(BIN)/dsv4
	$(BIN)/python benchmarks/gpu_check.py --dry-run --out build/gpu-check-dry --wheels $(GPU_WHEELS)

lint: $(BIN)/dsv4
	$(BIN)/ruff check src tests benchmarks tools

fmt: $(BIN)/dsv4
	$(BIN)/ruff check --fix src tests benchmarks tools

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
