"""The supervisor restarts what dies, with backoff and a limit, and says so; real child processes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ragpod.processes import ROOT, Child, free_port, pid_alive, spawn, wait_until
from ragpod.supervisor import (
    PID_FILE,
    RestartPolicy,
    Stack,
    Supervisor,
    api_keys_on,
    stop_leftovers,
    write_pid_file,
)
from ragpod.tuning import MODEL_TUNING

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
FAIL = [sys.executable, "-c", "raise SystemExit(3)"]
# Answers GET /healthz with 200 on the port given, like a service.
HEALTHY = """
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


class Sleepers(Stack):
    """A stack of plain processes: each name runs the command given for it."""

    def __init__(self, commands: dict[str, list[str]], log_dir: Path) -> None:
        super().__init__(ports={}, redis_port=0, data_dir=log_dir, log_dir=log_dir)
        self.commands = commands
        for name in commands:
            self.start_one(name)

    def start_one(self, name: str) -> Child:
        child = spawn(name, self.commands[name], {}, self.log_dir, own_session=True)
        self.procs = [proc for proc in self.procs if proc.name != name] + [child]
        return child


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Sleepers]:
    stack = Sleepers({"worker": SLEEP, "gateway": SLEEP}, tmp_path)
    yield stack
    stack.stop()


def port_answers(port: int) -> bool:
    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_killed_process_is_restarted_and_the_others_keep_running(stack: Sleepers) -> None:
    out = io.StringIO()
    supervisor = Supervisor(stack, RestartPolicy(first_backoff=0.2), out=out)
    killed, other = stack.proc("worker").pid, stack.proc("gateway").pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: supervisor.poll() and "worker restarted" in out.getvalue(), 120, "restart")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("worker was killed by SIGKILL; restarting it in 0 s (restart 1 of 5)")
    assert "the other services keep serving" in lines[0]
    assert lines[1] == f"worker restarted, pid {stack.proc('worker').pid}"
    assert stack.proc("worker").pid != killed and stack.proc("worker").alive()
    assert stack.proc("gateway").pid == other and stack.proc("gateway").alive()


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(first_backoff=1, max_backoff=30)
    assert [policy.delay(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_process_that_keeps_failing_stops_the_stack_after_the_limit(tmp_path: Path) -> None:
    stack = Sleepers({"worker": FAIL, "gateway": SLEEP}, tmp_path)
    out = io.StringIO()
    try:
        supervisor = Supervisor(stack, RestartPolicy(max_restarts=2, first_backoff=0.0), out=out)
        status = supervisor.run(lambda: False, interval=0.05)
    finally:
        stack.stop()
    assert status == 1 and supervisor.failed == "worker"
    lines = out.getvalue().splitlines()
    assert [line.split(";")[0] for line in lines[:4]] == [
        "worker exited with status 3",
        "worker restarted, pid " + lines[1].rsplit(" ", 1)[1],
        "worker exited with status 3",
        "worker restarted, pid " + lines[3].rsplit(" ", 1)[1],
    ]
    assert lines[4].startswith("worker exited with status 3 again after 2 restarts; giving up")


def test_a_process_that_ran_a_while_starts_with_a_fresh_count(stack: Sleepers) -> None:
    clock = Clock()
    out = io.StringIO()
    supervisor = Supervisor(
        stack, RestartPolicy(max_restarts=1, first_backoff=1, stable_after=60), out=out, clock=clock
    )

    def kill_and_restart() -> None:
        pid = stack.proc("worker").pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not stack.proc("worker").alive(), 120, "worker to die")
        assert supervisor.poll()  # notices, schedules in 1 s
        clock.now += 1
        assert supervisor.poll()  # starts it again

    kill_and_restart()
    clock.now += 61  # it ran for a minute: the next death is a first one again
    kill_and_restart()
    assert out.getvalue().count("(restart 1 of 1)") == 2 and "giving up" not in out.getvalue()
    clock.now += 5  # a quick second death is one too many
    pid = stack.proc("worker").pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not stack.proc("worker").alive(), 120, "worker to die")
    assert not supervisor.poll()
    assert "giving up" in out.getvalue()


def test_a_service_that_stops_answering_healthz_is_restarted_and_the_console_says_so(tmp_path: Path) -> None:
    port = free_port()
    stack = Sleepers({"gateway": [sys.executable, "-c", HEALTHY, str(port)], "worker": SLEEP}, tmp_path)
    stack.ports = {"gateway": port}  # the worker has no port: nothing to probe
    clock = Clock()
    out = io.StringIO()
    policy = RestartPolicy(first_backoff=1, unresponsive_after=30, probe_interval=5, probe_timeout=0.5)
    supervisor = Supervisor(stack, policy, out=out, clock=clock)
    try:
        wait_until(lambda: stack.proc("gateway").alive() and port_answers(port), 60, "server")
        assert supervisor.poll()  # its first probe is answered: the count of silence starts from here
        hung = stack.proc("gateway").pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)  # alive, holding its port, answering nothing: a hung event loop
        for _ in range(5):  # 25 s without an answer: not yet
            clock.now += 5
            assert supervisor.poll()
        assert out.getvalue() == "" and stack.proc("gateway").pid == hung
        clock.now += 5
        assert supervisor.poll()  # 30 s: stopped, and its restart scheduled
        wait_until(lambda: not pid_alive(hung), 30, "the hung process to be stopped")
        clock.now += 1
        assert supervisor.poll()
        restarted = stack.proc("gateway").pid
        lines = out.getvalue().splitlines()
        assert lines[0].startswith("gateway stopped answering /healthz for 30 s; restarting it in 1 s (restart 1 of 5)")
        assert lines[1] == f"gateway restarted, pid {restarted}"
        assert restarted != hung and stack.proc("gateway").alive()
        # The new process has not answered yet: however long it takes to start, it is not restarted for that.
        clock.now += 60
        assert supervisor.poll() and stack.proc("gateway").pid == restarted
        assert stack.proc("worker").alive()
    finally:
        stack.stop()


def test_the_model_processes_start_with_the_model_tuning_and_an_exported_value_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in MODEL_TUNING:
        monkeypatch.delenv(name, raising=False)
    ports = {"gateway": 1, "embedding": 2, "retriever": 3, "llm": 4}
    stack = Stack(ports=ports, redis_port=5, data_dir=tmp_path, log_dir=None)
    for name in ("embedding", "llm"):
        assert {key: stack.env_for(name).get(key) for key in MODEL_TUNING} == MODEL_TUNING
    for name in ("gateway", "retriever"):
        assert set(stack.env_for(name)).isdisjoint(MODEL_TUNING)
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")  # exported by whoever runs the stack: inherited as it is
    assert "GOMP_SPINCOUNT" not in stack.env_for("embedding")
    assert stack.env_for("embedding")["MALLOC_TRIM_THRESHOLD_"] == MODEL_TUNING["MALLOC_TRIM_THRESHOLD_"]
    overridden = Stack(ports, 5, tmp_path, None, extra_env={"MALLOC_TRIM_THRESHOLD_": "0"})
    assert overridden.env_for("llm")["MALLOC_TRIM_THRESHOLD_"] == "0"


PARENT = """
import sys, time
from pathlib import Path
from ragpod.processes import spawn
child = spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"], {}, Path(sys.argv[1]),
              own_session=True, die_with_parent=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_child_started_to_die_with_its_parent_ends_when_the_parent_is_killed_9(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert pid_alive(child)
        parent.kill()  # SIGKILL: no handler of the parent's runs
        parent.wait(10)
        wait_until(lambda: not pid_alive(child), 10, "the child to end with its parent")
    finally:
        parent.kill()


def test_leftovers_of_a_supervisor_that_died_are_stopped_and_named(tmp_path: Path) -> None:
    leftover = spawn("gateway", SLEEP, {}, tmp_path, own_session=True)
    reused = spawn("worker", SLEEP, {}, tmp_path, own_session=True)  # stands for a pid now running another command
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid_file = tmp_path / PID_FILE
    write_pid_file(pid_file, [leftover])
    recorded = json.loads(pid_file.read_text())
    recorded["supervisor"] = dead.pid
    recorded["children"].append({"name": "llm", "pid": reused.pid, "args": ["python", "-m", "services.llm"]})
    pid_file.write_text(json.dumps(recorded))
    out = io.StringIO()
    try:
        assert stop_leftovers(pid_file, out) is None
        assert not leftover.alive() and reused.alive()
        assert out.getvalue() == (
            f"stopped what an earlier ragpod run (pid {dead.pid}) left running: gateway pid {leftover.pid}\n"
        )
        assert not pid_file.exists()
    finally:
        leftover.stop()
        reused.stop()


def test_a_pid_file_of_a_supervisor_still_running_is_left_alone(tmp_path: Path) -> None:
    child = spawn("gateway", SLEEP, {}, tmp_path, own_session=True)
    supervisor = subprocess.Popen(SLEEP)
    pid_file = tmp_path / PID_FILE
    write_pid_file(pid_file, [child])
    pid_file.write_text(json.dumps({**json.loads(pid_file.read_text()), "supervisor": supervisor.pid}))
    try:
        assert stop_leftovers(pid_file, io.StringIO()) == supervisor.pid
        assert child.alive() and pid_file.exists()
    finally:
        child.stop()
        supervisor.kill()
        supervisor.wait()


def test_with_keys_on_the_gateway_also_takes_the_digest_of_the_supervisors_own_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest_only = "sha256:" + hashlib.sha256(b"a key the supervisor never sees").hexdigest()
    monkeypatch.setenv("RAG_API_KEYS", digest_only)
    ports = {"gateway": 1, "embedding": 2, "retriever": 3, "llm": 4}
    stack = Stack(ports=ports, redis_port=5, data_dir=tmp_path, log_dir=None, api_key="own-key")
    own = "sha256:" + hashlib.sha256(b"own-key").hexdigest()
    assert stack.env_for("gateway")["RAG_API_KEYS"] == f"{digest_only},{own}"
    assert "RAG_API_KEYS" not in stack.env_for("llm")  # inherited as it is; only the gateway reads it
    assert "own-key" not in str(stack.env_for("gateway"))
    monkeypatch.delenv("RAG_API_KEYS")
    assert "RAG_API_KEYS" not in Stack(ports, 5, tmp_path, None).env_for("gateway")  # keys stay off


def test_a_keys_file_alone_turns_keys_on_for_the_supervisor_s_own_checks() -> None:
    assert api_keys_on({"RAG_API_KEYS_FILE": "/etc/ragpod/keys.yaml"})
    assert api_keys_on({"RAG_API_KEYS": "k"})
    assert not api_keys_on({"RAG_API_KEYS": " , ", "RAG_API_KEYS_FILE": " "})
    assert not api_keys_on({})


SIGNAL_MID_START = """
import os, signal, sys
from pathlib import Path
from ragpod import supervisor

def start(self, **_):  # the signal arrives while source text runs, as when a dataclass is made on an import
    exec("import os, signal, time; os.kill(os.getpid(), signal.SIGHUP); time.sleep(30)")

supervisor.Stack.start = start
sys.exit(supervisor.main(Path(sys.argv[1]), {name: 1 for name in ("gateway", "embedding", "retriever", "llm")}))
"""


def test_a_stop_signal_while_the_stack_starts_ends_the_run_with_130(tmp_path: Path) -> None:
    (tmp_path / "stop_mid_start.py").write_text(SIGNAL_MID_START)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    env.pop("RAG_API_KEYS", None)
    run = subprocess.run(
        [sys.executable, "-m", "stop_mid_start", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    # run with -m, as `ragpod` is: not killed by SIGINT (-2) at exit, as a caught KeyboardInterrupt would be
    assert run.returncode == 130, (run.returncode, run.stdout, run.stderr)
    assert "stopping ..." in run.stdout
