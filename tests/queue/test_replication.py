"""What Redis replication promises the queue, checked against a real primary and replica, and said so.

``min-replicas-to-write`` (deploy/k8s/base/redis.yaml) does not make replication
synchronous: a primary cut off from its replica keeps accepting jobs until the
replica's last acknowledgement is ``min-replicas-max-lag`` seconds old, and a
job accepted then exists on the primary alone. The deploy docs must say that
window, not that an accepted job is on two machines.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from ragpod.processes import free_port
from ragpod.redis_server import start_redis
from services.common.queue import Job, JobQueue
from services.llm.config import Settings
from tests.fixtures.llm import wait_for

ROOT = Path(__file__).resolve().parents[2]
MAX_LAG = 1  # seconds; the manifests use 10


@pytest.fixture
async def primary_and_replica() -> AsyncIterator[tuple[Redis, Redis, int]]:
    primary_port, replica_port = free_port(), free_port()
    primary_proc, replica_proc = start_redis(primary_port), start_redis(replica_port)
    primary = Redis(port=primary_port, decode_responses=True)
    replica = Redis(port=replica_port, decode_responses=True)
    try:
        await replica.execute_command("REPLICAOF", "127.0.0.1", str(primary_port))
        await primary.config_set("min-replicas-to-write", 1)
        await primary.config_set("min-replicas-max-lag", MAX_LAG)
        await wait_for(lambda: _replica_online(primary), within=20)
        assert replica_proc.pid is not None
        yield primary, replica, replica_proc.pid
    finally:
        if replica_proc.pid is not None:
            os.kill(replica_proc.pid, signal.SIGCONT)
        await primary.aclose()
        await replica.aclose()
        replica_proc.stop()
        primary_proc.stop()


async def _replica_online(primary: Redis) -> bool:
    info = await primary.info("replication")
    return int(info.get("connected_slaves", 0)) == 1 and int(info.get("min_slaves_good_slaves", 0)) == 1


async def _refused(queue: JobQueue) -> bool:
    try:
        await queue.enqueue(Job(messages=[{"role": "user", "content": "x"}], timeout_s=60))
    except ResponseError as exc:
        return "NOREPLICAS" in str(exc)
    return False


async def test_a_cut_off_primary_accepts_jobs_only_for_the_lag_window(
    primary_and_replica: tuple[Redis, Redis, int],
) -> None:
    primary, replica, replica_pid = primary_and_replica
    settings = Settings(llm_stream="t:replication", llm_group="t:replication:workers")
    queue = JobQueue(primary, settings)
    await queue.enqueue(Job(messages=[{"role": "user", "content": "replicated"}], timeout_s=60))
    await wait_for(lambda: _replica_has(replica, settings.llm_stream, 1), within=10)

    os.kill(replica_pid, signal.SIGSTOP)  # a partition: the replica stops acknowledging
    accepted = await queue.enqueue(Job(messages=[{"role": "user", "content": "primary only"}], timeout_s=60))
    assert accepted.admitted  # inside the window: accepted, though no replica has it
    assert await primary.xlen(settings.llm_stream) == 2
    await wait_for(lambda: _refused(queue), within=MAX_LAG + 10)  # past the window: refused (a 503)
    os.kill(replica_pid, signal.SIGCONT)


async def _replica_has(replica: Redis, stream: str, count: int) -> bool:
    return int(await replica.xlen(stream)) == count


def test_the_deploy_docs_state_the_window_instead_of_two_machines() -> None:
    readme = (ROOT / "deploy/k8s/README.md").read_text()
    manifest = (ROOT / "deploy/k8s/base/redis.yaml").read_text()
    for text in (readme, manifest):
        assert "on two machines" not in text
        assert "min-replicas-max-lag" in text
        assert "not synchronous" in text
