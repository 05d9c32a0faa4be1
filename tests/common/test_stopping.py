"""A stop signal while a model loads ends the process within seconds (services.common.stopping).

Each process is signalled while its load is certainly still running: a load that sleeps for ten minutes in
a thread, or a real LLM converting its GGUF weights into an empty cache (tens of seconds). Without the
rule, each would finish its load before it stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ragpod.processes import ROOT, free_port, port_open

pytestmark = pytest.mark.slow

STOPPED_WITHIN = 15.0  # seconds; the loads below take ten minutes, or tens of seconds

# A service run by services.common.serve whose "model" loads in a thread for ten minutes, either while the
# app starts (as the LLM model server's does) or in the background once it has started (as the
# embedding service's does). It prints "loading" when the load has begun.
APP = """
import asyncio, contextlib, sys, time
from fastapi import FastAPI
from services.common.serve import run
from services.common.settings import ServiceSettings
from services.common.stopping import loading

background = sys.argv[1] == "background"

async def load():
    with loading("test model"):
        print("loading", flush=True)
        await asyncio.to_thread(time.sleep, 600)

@contextlib.asynccontextmanager
async def lifespan(app):
    task = asyncio.create_task(load()) if background else None
    if not background:
        await load()
    yield {}

settings = ServiceSettings(port=int(sys.argv[2]), host="127.0.0.1")
run("test", settings, lambda: FastAPI(lifespan=lifespan))
"""


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def start(procs: list[subprocess.Popen[str]], args: list[str], **env: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        args, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    procs.append(proc)
    return proc


def stops_promptly(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOPPED_WITHIN)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {STOPPED_WITHIN:.0f} s after SIGTERM") from None
    assert proc.returncode == -signal.SIGTERM, proc.returncode  # the signal's own default action


def wait_for(check: object, proc: subprocess.Popen[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        if callable(check) and check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not reached in {timeout:.0f} s")


def wait_for_line(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"{text!r} never printed:\n" + "".join(seen[-20:]))


@pytest.mark.parametrize("when", ["startup", "background"])
def test_a_service_stops_at_once_while_its_model_loads(started: list[subprocess.Popen[str]], when: str) -> None:
    port = free_port()
    proc = start(started, [sys.executable, "-c", APP, when, str(port)])
    wait_for_line(proc, "loading")
    if when == "background":
        wait_for(lambda: port_open(port), proc)  # started and serving, the model still loading
    stops_promptly(proc)


def test_the_llm_worker_stops_at_once_while_its_model_loads(
    started: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    side = free_port()
    proc = start(
        started,
        [sys.executable, "-m", "services.llm"],
        RAG_HOST="127.0.0.1",
        RAG_PORT=str(side),
        RAG_LLM_BACKEND="local",
        RAG_LLM_DEVICE="cpu",
        RAG_LLM_MODEL_CACHE_DIR=str(tmp_path / "models"),  # empty: the GGUF is converted, tens of seconds
        RAG_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # nothing there: the engine loads before Redis
    )
    # The side port answers while the engine loads; /readyz says not ready until it has.
    wait_for(lambda: port_open(side), proc)
    assert httpx.get(f"http://127.0.0.1:{side}/readyz", timeout=5).status_code == 503
    stops_promptly(proc)


def test_the_llm_model_server_stops_at_once_while_its_model_loads(
    started: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    port = free_port()
    proc = start(
        started,
        [sys.executable, "-m", "services.llm.server"],
        RAG_HOST="127.0.0.1",
        RAG_LLM_SERVE_PORT=str(port),
        RAG_LLM_DEVICE="cpu",
        RAG_LLM_MODEL_CACHE_DIR=str(tmp_path / "models"),
        RAG_LOG_LEVEL="info",
    )
    wait_for_line(proc, "llm_model_loading")  # its port opens only once the model has loaded
    assert not port_open(port)
    stops_promptly(proc)
