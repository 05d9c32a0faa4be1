"""Child processes: start one with its log in a file, wait until it is ready, stop it.

The supervisor and the process-level tests use the same helpers.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

ROOT = Path(__file__).resolve().parent.parent


_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, never one this process was given before.

    The kernel may give a closed port straight back, so two calls in a row can name the same one: ``ragpod run``
    started the embedding service and the retriever on one port that way, and the second failed to bind.
    """
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class Child(Protocol):
    """What the supervisor needs of anything it runs: a process of its own, or a server a library runs."""

    name: str

    @property
    def pid(self) -> int | None: ...

    @property
    def returncode(self) -> int | None: ...

    def alive(self) -> bool: ...

    def stop(self, timeout: float = 15.0) -> int | None: ...

    def log_tail(self, lines: int = 30) -> str: ...


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

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
        return tail(self.log_path, lines)


def pid_alive(pid: int) -> bool:
    """A process of that id exists (it may be one this process did not start)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with(parent: int) -> Callable[[], None]:
    """Runs in the child before it executes: SIGTERM when the process that started it dies, however it
    dies (kill -9 included); at once if it has died already. Linux only (elsewhere nothing happens)."""

    def arm() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def spawn(
    name: str,
    args: Sequence[str],
    env: Mapping[str, str],
    log_dir: Path | None,
    own_session: bool = False,
    die_with_parent: bool = False,
) -> Proc:
    """Start ``args`` with ``env`` added to this process' environment, its output appended to ``log_dir/name.log``.

    ``own_session`` puts the child in a session of its own, so that a Ctrl-C in the terminal reaches only
    the caller, which then stops its children in order. ``die_with_parent``: the child gets SIGTERM when
    this process dies, so a supervisor killed outright leaves nothing running (the signal follows the
    thread that starts the child: start it from a thread that lives as long as the process).
    """
    full_env = {**os.environ, **env}
    preexec = die_with(os.getpid()) if die_with_parent else None
    log_path = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        out = open(log_path, "ab")  # noqa: SIM115 - owned by the child process
        popen = subprocess.Popen(
            args,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=own_session,
            preexec_fn=preexec,
        )
        out.close()
    else:
        popen = subprocess.Popen(args, env=full_env, cwd=ROOT, start_new_session=own_session, preexec_fn=preexec)
    return Proc(name, popen, log_path)


def start_service(
    name: str, env: Mapping[str, str], log_dir: Path | None, own_session: bool = False, die_with_parent: bool = False
) -> Proc:
    """``python -m services.<name>``: the same command as the service's container."""
    return spawn(name, [sys.executable, "-m", f"services.{name}"], env, log_dir, own_session, die_with_parent)


def wait_until(check: Callable[[], object], timeout: float, what: str, proc: Child | None = None) -> None:
    """Poll ``check`` until it is true; raise naming ``what`` when ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{proc.log_tail()}")
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s\n{proc.log_tail() if proc else ''}")


def ready(port: int) -> bool:
    """The service on ``port`` answers ``/readyz`` with 200."""
    return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
