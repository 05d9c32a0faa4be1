"""How long torch's OpenMP threads spin: what libgomp itself reports reading (``OMP_DISPLAY_ENV``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.cpu import SPIN_COUNT
from tests.fixtures.uvicorn_server import free_port

ROOT = Path(__file__).resolve().parents[2]
SPIN = re.compile(r"GOMP_SPINCOUNT = '(\d+)'")


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    return {**env, "OMP_DISPLAY_ENV": "VERBOSE", **extra}


def libgomp_reads(code: str, **extra: str) -> tuple[str, str]:
    """What ``code`` printed, and the spin count libgomp printed when torch loaded it."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environment(**extra), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = SPIN.search(done.stderr)
    assert found, done.stderr[-2000:]
    return done.stdout.strip(), found.group(1)


SET_THEN_IMPORT = "from services.common.cpu import spin_briefly; print(spin_briefly()); import torch"


def test_set_before_torch_is_imported_libgomp_spins_briefly() -> None:
    assert libgomp_reads(SET_THEN_IMPORT) == ("True", SPIN_COUNT)


def test_a_spin_count_in_the_environment_is_left_as_it_is() -> None:
    assert libgomp_reads(SET_THEN_IMPORT, GOMP_SPINCOUNT="1234") == ("False", "1234")


def test_once_torch_is_imported_it_is_too_late_and_nothing_is_changed() -> None:
    printed, spins = libgomp_reads(
        "import torch, os; from services.common.cpu import spin_briefly; "
        "print(spin_briefly(), 'GOMP_SPINCOUNT' in os.environ)"
    )
    assert printed == "False False"
    assert spins != SPIN_COUNT  # libgomp's own default


@pytest.mark.parametrize("service", ["embedding", "llm", "llm.server"])
def test_a_model_services_entry_point_sets_it_before_its_model_loads_torch(service: str) -> None:
    # The LLM worker loads its engine before it needs Redis: a closed port is enough to get that far. The
    # model server (services.llm.server) loads its engine as it starts.
    env = environment(
        RAG_HOST="127.0.0.1",
        RAG_PORT=str(free_port()),
        RAG_LOG_LEVEL="warning",
        RAG_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        RAG_LLM_SERVE_PORT=str(free_port()),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", f"services.{service}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        deadline = time.monotonic() + 120
        seen: list[str] = []
        while time.monotonic() < deadline and (line := proc.stderr.readline()):
            seen.append(line)
            if found := SPIN.search(line):
                assert found.group(1) == SPIN_COUNT
                return
        raise AssertionError("libgomp never reported its spin count:\n" + "".join(seen[-20:]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
