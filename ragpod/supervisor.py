"""The whole stack as local processes: ``make run`` / ``ragpod run``.

Starts a Redis server (see :mod:`ragpod.redis_server`) and the four services with
``python -m services.<name>``, waits until each is ready and the gateway's ``GET /v1/status`` reports the
whole chain "ok", indexes the demo corpus and prints how to ask.
Then it watches them the way a cluster would: a service that dies is started again after a backoff
(1 s, doubling, at most 30 s) and the console says so, while the others keep serving; a service that
fails ``max_restarts`` times in a row (each within a minute of its start) stops the stack. A service that
is alive but stops answering ``/healthz`` with 200 for ``RestartPolicy.unresponsive_after`` seconds (30 by
default, counted from its first answer, as a liveness probe after its start-up) is stopped and restarted the
same way. Ctrl-C stops every process it started, in order. The end-to-end tests start their stacks with
the same :class:`Stack`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import httpx

from ragpod.documents import read_documents
from ragpod.processes import ROOT, Child, Proc, pid_alive, port_open, ready, start_service, wait_until
from ragpod.redis_server import RedisDataError, available_servers, choose_server, start_redis
from ragpod.tuning import MODEL_PROCESSES, model_tuning

SERVICES = ("embedding", "retriever", "llm", "gateway")
PORTS = {"gateway": 8000, "embedding": 8001, "retriever": 8002, "llm": 8003}
REDIS_PORT = 6379


@dataclass
class Stack:
    """Four services and, unless one was already running, a Redis server."""

    ports: dict[str, int]
    redis_port: int
    data_dir: Path
    log_dir: Path | None
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[Child] = field(default_factory=list)
    own_session: bool = False
    die_with_parent: bool = False  # each child gets SIGTERM when this process dies (ragpod.processes.spawn)
    pid_file: Path | None = None  # kept up to date with the processes started; removed by ``stop``
    api_key: str = ""  # the supervisor's own key: its digest joins the gateway's RAG_API_KEYS

    def env_for(self, name: str) -> dict[str, str]:
        """The environment ``name`` starts with, besides this process's own: the stack's addresses, the model
        tuning of ``ragpod.tuning`` for a process that runs a model (a value exported here wins), and
        ``extra_env`` over all of it; with ``api_key``, the gateway's keys are its own plus that key's digest."""
        p = self.ports
        tuning = model_tuning() if name in MODEL_PROCESSES else {}
        env = {
            **tuning,
            "RAG_PORT": str(p[name]),
            "RAG_HOST": "127.0.0.1",
            "RAG_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "RAG_EMBEDDING_URL": f"http://127.0.0.1:{p['embedding']}",
            "RAG_RETRIEVER_URL": f"http://127.0.0.1:{p['retriever']}",
            "RAG_QDRANT_PATH": str(self.data_dir / "qdrant"),
            "RAG_LLM_MODEL_CACHE_DIR": str(self.data_dir / "models"),
            **self.extra_env,
        }
        if name == "gateway" and self.api_key:
            keys = env.get("RAG_API_KEYS", os.environ.get("RAG_API_KEYS", "")).strip().strip(",")
            own = "sha256:" + hashlib.sha256(self.api_key.encode("utf-8")).hexdigest()
            env["RAG_API_KEYS"] = f"{keys},{own}" if keys else own
        return env

    def start_one(self, name: str) -> Child:
        """Start ``redis`` or one service (not waiting for it to be ready); it replaces a dead one of that name."""
        if name == "redis":
            data = self.data_dir / "redis"
            child = start_redis(self.redis_port, data, self.log_dir, persist=True, die_with_parent=self.die_with_parent)
        else:
            env, session, dies = self.env_for(name), self.own_session, self.die_with_parent
            child = start_service(name, env, self.log_dir, own_session=session, die_with_parent=dies)
        self.procs = [proc for proc in self.procs if proc.name != name] + [child]
        if self.pid_file is not None:
            write_pid_file(self.pid_file, self.procs)
        return child

    def start(self, redis: bool = True, ready_timeout: float = 300.0) -> None:
        try:
            if redis and not port_open(self.redis_port):
                self.start_one("redis")
            for name in SERVICES:
                self.start_one(name)
            for proc in self.procs:
                if proc.name in self.ports:
                    wait_until(functools.partial(ready, self.ports[proc.name]), ready_timeout, proc.name, proc)
        except BaseException:
            self.stop()
            raise

    def proc(self, name: str) -> Child:
        return next(p for p in self.procs if p.name == name)

    def stop(self) -> None:
        """Stop in reverse start order: the gateway first, Redis last (the LLM worker drains into it)."""
        order = {name: i for i, name in enumerate(("redis", *SERVICES))}
        for proc in sorted(self.procs, key=lambda p: order.get(p.name, -1), reverse=True):
            proc.stop()
        self.procs.clear()
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)


PID_FILE = "ragpod.pid"


class Interrupted(BaseException):
    """A stop signal before the stack is up. Not KeyboardInterrupt: CPython remembers one that passes through
    an ``exec`` of source text (dataclasses and namedtuples are made that way, on imports mid-start) and, run
    with ``-m``, ends itself by SIGINT at exit even though it was caught, instead of returning 130."""


def write_pid_file(path: Path, procs: list[Child]) -> None:
    """This supervisor's pid and each child's pid and command line, replaced atomically."""
    children = [
        {"name": proc.name, "pid": proc.pid, "args": [str(arg) for arg in proc.popen.args]}  # type: ignore[union-attr]
        for proc in procs
        if isinstance(proc, Proc)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"supervisor": os.getpid(), "children": children}))
    temporary.replace(path)


def _command_line(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def stop_leftovers(path: Path, out: TextIO = sys.stdout, timeout: float = 15.0) -> int | None:
    """Stops what a supervisor that died left running, as its pid file lists it, and says so.

    Returns the pid of a supervisor that is still running (then nothing is touched), else None. A child
    is stopped only while its pid still runs the command recorded for it (a pid may have been reused)."""
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        path.unlink(missing_ok=True)
        return None
    supervisor = int(recorded.get("supervisor", 0))
    if supervisor and supervisor != os.getpid() and pid_alive(supervisor):
        return supervisor
    left = [
        child
        for child in recorded.get("children", [])
        if pid_alive(int(child["pid"])) and _command_line(int(child["pid"])) == child["args"]
    ]
    for child in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(child["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid_alive(int(child["pid"])) for child in left) and time.monotonic() < deadline:
        time.sleep(0.1)
    for child in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(child["pid"]), signal.SIGKILL)
    if left:
        names = ", ".join(f"{child['name']} pid {child['pid']}" for child in left)
        print(f"stopped what an earlier ragpod run (pid {supervisor}) left running: {names}", file=out, flush=True)
    path.unlink(missing_ok=True)
    return None


@dataclass
class RestartPolicy:
    max_restarts: int = 5
    first_backoff: float = 1.0
    max_backoff: float = 30.0
    stable_after: float = 60.0
    # A liveness probe: ``/healthz`` asked every ``probe_interval`` s, each answer awaited ``probe_timeout`` s;
    # no 200 for ``unresponsive_after`` s (0: never) and the process is stopped and restarted.
    unresponsive_after: float = 30.0
    probe_interval: float = 5.0
    probe_timeout: float = 2.0

    def delay(self, restarts: int) -> float:
        return float(min(self.first_backoff * 2**restarts, self.max_backoff))


@dataclass
class _Watch:
    started_at: float
    restarts: int = 0
    due: float | None = None
    awaiting_ready: bool = False
    healthy_at: float | None = None  # its last 200 from /healthz; None: none yet since its start
    probed_at: float | None = None


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class Supervisor:
    """Restarts what dies in a :class:`Stack`, with backoff and a limit, and says so on ``out``."""

    def __init__(
        self,
        stack: Stack,
        policy: RestartPolicy | None = None,
        out: TextIO = sys.stdout,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stack = stack
        self.policy = policy or RestartPolicy()
        self.out = out
        self.clock = clock
        now = clock()
        self.watches = {proc.name: _Watch(started_at=now) for proc in stack.procs}
        self.failed: str | None = None

    def say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    def log_hint(self, name: str) -> str:
        return f" (log: {self.stack.log_dir / f'{name}.log'})" if self.stack.log_dir else ""

    def poll(self) -> bool:
        """One turn: notice deaths, start what is due, report readiness. False once a service gave up."""
        now = self.clock()
        for name, watch in self.watches.items():
            if watch.due is not None:
                if now >= watch.due:
                    self._restart(name, watch, now)
                continue
            proc = self.stack.proc(name)
            if not proc.alive():
                self._schedule(name, watch, describe_exit(proc.returncode), proc.log_tail(5), now)
                if self.failed:
                    return False
            elif self._unresponsive(name, watch, now):
                seconds = f"{self.policy.unresponsive_after:g}"
                proc.stop(timeout=5.0)
                self._schedule(name, watch, f"stopped answering /healthz for {seconds} s", proc.log_tail(5), now)
                if self.failed:
                    return False
            elif watch.awaiting_ready and name in self.stack.ports and _ready_now(self.stack.ports[name]):
                watch.awaiting_ready = False
                self.say(f"{name} is ready again")
        return self.failed is None

    def _unresponsive(self, name: str, watch: _Watch, now: float) -> bool:
        """Asks ``/healthz`` when a probe is due; True once it has not answered 200 for ``unresponsive_after`` s.

        The count starts at the first 200 since the process started: a model that is still loading is what a
        start-up probe waits for, not a liveness failure."""
        port = self.stack.ports.get(name)
        if port is None or not self.policy.unresponsive_after:
            return False
        if watch.probed_at is not None and now - watch.probed_at < self.policy.probe_interval:
            return False
        watch.probed_at = now
        if _alive_now(port, self.policy.probe_timeout):
            watch.healthy_at = now
            return False
        return watch.healthy_at is not None and now - watch.healthy_at >= self.policy.unresponsive_after

    def _schedule(self, name: str, watch: _Watch, how: str, log_tail: str, now: float) -> None:
        if now - watch.started_at >= self.policy.stable_after:
            watch.restarts = 0
        if watch.restarts >= self.policy.max_restarts:
            self.failed = name
            self.say(
                f"{name} {how} again after {watch.restarts} restarts; giving up, the stack stops"
                f"{self.log_hint(name)}\n{log_tail}"
            )
            return
        delay = self.policy.delay(watch.restarts)
        watch.restarts += 1
        watch.due = now + delay
        watch.awaiting_ready = False
        self.say(
            f"{name} {how}; restarting it in {delay:.0f} s (restart {watch.restarts} of "
            f"{self.policy.max_restarts}){self.log_hint(name)}; the other services keep serving"
        )

    def _restart(self, name: str, watch: _Watch, now: float) -> None:
        watch.due = None
        watch.started_at = now
        watch.healthy_at = watch.probed_at = None
        try:
            proc = self.stack.start_one(name)
        except (RuntimeError, OSError) as exc:
            self._schedule(name, watch, f"failed to start ({exc})", "", now)
            return
        watch.awaiting_ready = True
        pid = f", pid {proc.pid}" if proc.pid is not None else ""
        self.say(f"{name} restarted{pid}")

    def run(self, stopping: Callable[[], bool], interval: float = 0.5) -> int:
        while not stopping():
            if not self.poll():
                return 1
            time.sleep(interval)
        return 0


def _alive_now(port: int, timeout: float) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _ready_now(port: int) -> bool:
    try:
        return ready(port)
    except httpx.HTTPError:
        return False


def wait_for_chain(gateway: str, timeout: float = 120.0, headers: dict[str, str] | None = None) -> None:
    """Wait until the gateway's ``GET /v1/status`` reports every link of the chain "ok".

    A gateway without that route (404) is taken as ready: each service's ``/readyz`` already answered.
    """
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{gateway}/v1/status", timeout=10, headers=headers)
        except httpx.HTTPError as exc:
            last = str(exc)
        else:
            if response.status_code == 404:
                return
            if response.status_code == 200 and response.json().get("status") == "ok":
                return
            last = response.text[:500]
        time.sleep(0.5)
    raise RuntimeError(f"the chain is not ready after {timeout:.0f} s; GET /v1/status says {last}")


def converts_model(models_dir: Path) -> bool:
    """Whether the LLM worker's start will convert the packaged model: no converted copy is cached yet."""
    return not any(models_dir.glob("*/config.json"))


def api_keys_on(environ: Mapping[str, str]) -> bool:
    """Whether the gateway will want a key: RAG_API_KEYS holds one, or RAG_API_KEYS_FILE names a keys file.
    The supervisor's own key then joins RAG_API_KEYS (the default tenant's, with both scopes)."""
    return bool(environ.get("RAG_API_KEYS", "").strip(" ,") or environ.get("RAG_API_KEYS_FILE", "").strip())


def cli_example(gateway: str) -> str:
    """The banner's CLI line, pointed at the gateway this run started (any port)."""
    return f".venv/bin/ragpod --gateway {gateway} ask 'What does KEDA scale the LLM workers on?'"


def ingest_demo(gateway: str, headers: dict[str, str] | None = None) -> dict[str, int]:
    documents = read_documents(ROOT / "demo" / "corpus")
    response = httpx.post(f"{gateway}/v1/documents", json={"documents": documents}, timeout=300, headers=headers)
    response.raise_for_status()
    result: dict[str, int] = response.json()
    return result


def main(data_dir: Path = ROOT / "data", ports: dict[str, int] | None = None, unresponsive_after: float = 30.0) -> int:
    data_dir = data_dir.resolve()  # the services run in the repository's root, not in this process's directory
    ports = {**PORTS, "redis": REDIS_PORT, **(ports or {})}
    redis_port = ports.pop("redis")
    stack = Stack(
        ports=ports,
        redis_port=redis_port,
        data_dir=data_dir,
        log_dir=data_dir / "logs",
        own_session=True,
        die_with_parent=True,
        pid_file=data_dir / PID_FILE,
    )
    running = stop_leftovers(data_dir / PID_FILE)
    if running is not None:
        print(f"ragpod run is already running on {data_dir} (pid {running}); stop it first", file=sys.stderr)
        return 1
    # With API keys on (which may be digests only, that cannot be sent), the supervisor's own checks and the
    # demo ingest use a key made for this run: only its digest leaves this process, and it dies with the run.
    keys_on = api_keys_on(os.environ)
    if keys_on:
        stack.api_key = secrets.token_urlsafe(32)
    own = {"Authorization": f"Bearer {stack.api_key}"} if keys_on else None
    busy = [f"{n}:{p}" for n, p in stack.ports.items() if port_open(p)]
    if busy:
        print(f"ports already in use: {', '.join(busy)}; stop what runs there first", file=sys.stderr)
        return 1
    if port_open(redis_port):
        print(f"redis: using the server already listening on {redis_port}", flush=True)
    else:
        try:
            server = choose_server(data_dir / "redis", available_servers())
        except RedisDataError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"redis: {server.describe()} on {redis_port}, data in {data_dir / 'redis'}", flush=True)
    print(f"starting {', '.join(SERVICES)} (logs in {stack.log_dir}) ...", flush=True)
    if converts_model(data_dir / "models"):
        print("this first start converts the LLM to safetensors (about a minute); later starts are fast", flush=True)
    stopping = False
    supervising = False

    def on_signal(*_: object) -> None:
        # The services run in sessions of their own, so a Ctrl-C reaches only this process.
        nonlocal stopping
        stopping = True
        if not supervising:
            raise Interrupted

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)  # the terminal closed: stop as on Ctrl-C, not run on unsupervised
    try:
        stack.start()
        gateway = f"http://127.0.0.1:{stack.ports['gateway']}"
        wait_for_chain(gateway, headers=own)
        result = ingest_demo(gateway, headers=own)
        print(
            f"\nragpod is ready at {gateway}/  (indexed {result['indexed']} demo documents, {result['chunks']} chunks)"
        )
        print(
            f"\n  curl -s -X POST {gateway}/v1/ask -H 'Content-Type: application/json' \\\n"
            '       -d \'{"question": "How many embedding pods share one GPU with time-slicing?", "top_k": 3}\'\n'
        )
        print(f"  {cli_example(gateway)}\n")
        if keys_on:
            print(
                "API keys are on (RAG_API_KEYS, RAG_API_KEYS_FILE): add -H 'Authorization: Bearer <key>' to curl, "
                "export RAG_API_KEY for the CLI; the web page asks for one.\n"
            )
        print("processes: " + ", ".join(f"{p.name} pid {p.pid}" for p in stack.procs if p.pid is not None))
        print("a service that dies is restarted; Ctrl-C stops every process.", flush=True)
        supervising = True
        return Supervisor(stack, RestartPolicy(unresponsive_after=unresponsive_after)).run(lambda: stopping)
    except (RuntimeError, httpx.HTTPError) as exc:
        print(f"failed to start: {exc}", file=sys.stderr)
        return 1
    except Interrupted:
        return 130
    finally:
        print("stopping ...", flush=True)
        stack.stop()
