"""``ragpod run`` as a person runs it, on free ports and with API keys on (given as a digest only, which the
supervisor cannot send): kill -9 the LLM worker and watch the supervisor bring it back while the gateway keeps
answering; Ctrl-C stops every process."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ragpod.processes import free_port, pid_alive
from tests.fixtures.models import MODEL_CACHE

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = "run-key-0123456789"


class Console:
    """The supervisor's console, read line by line in a thread."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.lines.append("<closed>")
            self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> tuple[int, re.Match[str]]:
        """The first line from index ``after`` on matching ``pattern``; fails with the whole console otherwise."""
        compiled = re.compile(pattern)

        def found() -> tuple[int, re.Match[str]] | None:
            for index in range(after, len(self.lines)):
                match = compiled.search(self.lines[index])
                if match:
                    return index, match
            return None

        with self.changed:
            self.changed.wait_for(lambda: found() is not None or "<closed>" in self.lines, timeout)
            result = found()
        assert result is not None, f"{pattern!r} never appeared on the console:\n" + "\n".join(self.lines)
        return result


@pytest.fixture
def ragpod_run(tmp_path: Path) -> Iterator[tuple[Console, dict[str, int]]]:
    data = tmp_path / "data"
    data.mkdir()
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    (data / "models").symlink_to(MODEL_CACHE)  # the converted LLM, shared with the other tests
    ports = {name: free_port() for name in ("gateway", "embedding", "retriever", "llm", "redis")}
    command = [sys.executable, "-m", "ragpod", "run", "--data-dir", str(data)]
    command += [f"--port={name}={port}" for name, port in ports.items()]
    env = {
        **os.environ,
        "RAG_LLM_MAX_NEW_TOKENS": "32",
        "PYTHONUNBUFFERED": "1",
        "RAG_API_KEYS": "sha256:" + hashlib.sha256(KEY.encode()).hexdigest(),
    }
    popen = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    console = Console(popen)
    try:
        yield console, ports
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGINT)
            try:
                popen.wait(120)
            except subprocess.TimeoutExpired:
                popen.kill()
        for pid in started_pids(console):  # whatever a failed test left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def started_pids(console: Console) -> list[int]:
    text = "\n".join(console.lines)
    return [int(pid) for pid in re.findall(r"\bpid (\d+)", text)]


def test_a_killed_llm_worker_comes_back_while_the_gateway_keeps_answering(
    ragpod_run: tuple[Console, dict[str, int]],
) -> None:
    console, ports = ragpod_run
    ready_at, _ = console.wait_for(r"^ragpod is ready at ", 900)
    _, match = console.wait_for(r"^processes: (.*)$", 10, after=ready_at)
    pids = {name: int(pid) for name, pid in re.findall(r"(\w+) pid (\d+)", match.group(1))}
    assert {"gateway", "embedding", "retriever", "llm"} <= set(pids), pids

    question = {"question": "What does KEDA scale the LLM workers on?", "top_k": 3}
    base = f"http://127.0.0.1:{ports['gateway']}"
    assert httpx.get(f"{base}/v1/status").status_code == 401  # keys are on: the supervisor used a key of its own
    assert not any(KEY in line for line in console.lines)
    with httpx.Client(base_url=base, timeout=300, headers={"Authorization": f"Bearer {KEY}"}) as gateway:
        # "ready" waited for the whole chain, and the demo corpus was indexed.
        assert gateway.get("/v1/status").json()["status"] == "ok"
        assert gateway.get("/v1/documents", params={"limit": 1}).json()["documents"]
        os.kill(pids["llm"], signal.SIGKILL)
        killed_at, _ = console.wait_for(r"^llm was killed by SIGKILL; restarting it in 1 s \(restart 1 of 5\)", 30)
        with ThreadPoolExecutor(1) as pool:
            # Asked while no worker runs: the job waits in the queue for the worker that comes back.
            answer = pool.submit(gateway.post, "/v1/ask", json=question)
            assert gateway.get("/healthz").status_code == 200
            assert gateway.get("/readyz").status_code == 200
            _, restarted = console.wait_for(r"^llm restarted, pid (\d+)$", 60, after=killed_at)
            console.wait_for(r"^llm is ready again$", 300, after=killed_at)
            response = answer.result(timeout=300)
        assert response.status_code == 200, response.text
        assert response.json()["answer"].strip() and response.json()["sources"]

    new_pid = int(restarted.group(1))
    assert new_pid != pids["llm"] and pid_alive(new_pid)
    assert all(pid_alive(pids[name]) for name in ("gateway", "embedding", "retriever"))  # nobody else was restarted
    assert not any(re.match(r"^(gateway|embedding|retriever|redis) ", line) for line in console.lines[killed_at:])

    # Ctrl-C: every process it started stops, and it exits cleanly.
    console.popen.send_signal(signal.SIGINT)
    assert console.popen.wait(120) == 0, "\n".join(console.lines)
    console.wait_for(r"^stopping \.\.\.$", 5, after=killed_at)
    assert not any(pid_alive(pid) for pid in [*pids.values(), new_pid])


def start_run(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    """``ragpod run`` on free ports, its console discarded; returns it and its pid file."""
    data = tmp_path / "data"
    data.mkdir()
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    (data / "models").symlink_to(MODEL_CACHE)
    ports = {name: free_port() for name in ("gateway", "embedding", "retriever", "llm", "redis")}
    command = [sys.executable, "-m", "ragpod", "run", "--data-dir", str(data)]
    command += [f"--port={name}={port}" for name, port in ports.items()]
    popen = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    return popen, data / "ragpod.pid"


def every_child_started(pid_file: Path) -> dict[str, int]:
    """The processes the pid file lists once Redis and all four services have started (not yet ready)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            children = {c["name"]: int(c["pid"]) for c in json.loads(pid_file.read_text())["children"]}
            if {"redis", "embedding", "retriever", "llm", "gateway"} <= set(children):
                return children
        time.sleep(0.2)
    raise AssertionError(f"{pid_file} never listed every process")


def all_gone(pids: list[int], within: float) -> bool:
    deadline = time.monotonic() + within
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(pid_alive(pid) for pid in pids)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGHUP])
def test_when_the_supervisor_is_killed_9_or_its_terminal_closes_no_service_runs_on(
    tmp_path: Path, how: signal.Signals
) -> None:
    popen, pid_file = start_run(tmp_path)
    children: dict[str, int] = {}
    try:
        children = every_child_started(pid_file)
        popen.send_signal(how)
        popen.wait(120)
        assert all_gone(list(children.values()), 90), {n: p for n, p in children.items() if pid_alive(p)}
        if how == signal.SIGHUP:
            assert popen.returncode == 130  # it stopped its stack itself, as on Ctrl-C
            assert not pid_file.exists()
    finally:
        if popen.poll() is None:
            popen.kill()
        for pid in children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
