"""Workers say they are alive through the queue: counted while they beat, gone when they stop or die."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from services.common.queue import JobQueue
from services.llm.config import Settings
from services.llm.worker import Worker
from tests.fixtures.engines import ScriptedEngine
from tests.fixtures.llm import make_job, wait_for, worker_settings
from tests.fixtures.redis import RedisServer
from tests.fixtures.redis_proxy import RedisProxy

STREAM = "t:heartbeat"


def settings_for(redis_server: RedisServer, **overrides: Any) -> Settings:
    return worker_settings(redis_server, STREAM, **{"llm_drain_seconds": 1.0, **overrides})


async def test_a_running_worker_is_live_and_a_clean_stop_takes_it_out(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    queue = JobQueue(redis_client, settings_for(redis_server))
    assert await queue.live_workers() == 0
    worker_redis = Redis.from_url(redis_server.url, decode_responses=True)
    worker = Worker(settings_for(redis_server), ScriptedEngine(), worker_redis, name="beating")
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: _live_is(queue, 1))  # the first heartbeat is sent at start
        assert await redis_client.zrange(queue.workers_key(), 0, -1) == ["beating"]
        assert await redis_client.pttl(queue.workers_key()) > 0  # the set expires by itself after the last beat
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 10)
        await worker_redis.aclose()
    assert await queue.live_workers() == 0  # taken out as it stopped, not aged out
    assert await redis_client.exists(queue.workers_key()) == 0


async def test_a_draining_worker_is_no_longer_counted_live(redis_server: RedisServer, redis_client: Redis) -> None:
    """It takes no new job while it finishes the ones it has, so /v1/status must not count it as capacity."""
    queue = JobQueue(redis_client, settings_for(redis_server))
    worker_redis = Redis.from_url(redis_server.url, decode_responses=True)
    engine = ScriptedEngine(delay=0.3)  # "answer to: <question>": four words, 1.2 s in all
    settings = settings_for(redis_server, llm_drain_seconds=30.0)
    worker = Worker(settings, engine, worker_redis, name="draining")
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: _live_is(queue, 1))
        await queue.enqueue(make_job())
        await asyncio.wait_for(engine.started.wait(), 10)
        worker.request_stop()
        await wait_for(lambda: _live_is(queue, 0))
        assert not task.done(), "the worker stopped before its job was done: nothing was drained"
        await asyncio.wait_for(task, 30)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
        await worker_redis.aclose()
    assert len(engine.calls) == 1


async def test_a_worker_that_could_not_say_goodbye_ages_out(
    redis_server: RedisServer, redis_client: Redis, redis_proxy: RedisProxy
) -> None:
    # A visibility timeout of 0.6 s: a heartbeat every 0.2 s, live for 0.6 s after each.
    queue = JobQueue(redis_client, settings_for(redis_server))
    worker_redis = Redis.from_url(redis_proxy.url, decode_responses=True)
    worker = Worker(
        settings_for(redis_server, redis_url=redis_proxy.url, llm_visibility_timeout_seconds=0.6),
        ScriptedEngine(),
        worker_redis,
        name="cut-off",
    )
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: _live_is(queue, 1))
        await redis_proxy.stop()  # the worker loses Redis: no more heartbeats, and no goodbye
        worker.request_stop()
        await asyncio.wait_for(task, 10)
        assert await redis_client.zrange(queue.workers_key(), 0, -1) == ["cut-off"]  # still listed
        await wait_for(lambda: _live_is(queue, 0))
        assert await redis_client.zcard(queue.workers_key()) == 0  # trimmed, not only left uncounted
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 10)
        await worker_redis.aclose()


async def test_live_workers_counts_each_worker_once_however_often_it_beats(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    queue = JobQueue(redis_client, settings_for(redis_server))
    await queue.ensure_group()
    for _ in range(3):
        await queue.heartbeat("a", 30.0)
    await queue.heartbeat("b", 30.0)
    assert await queue.live_workers() == 2
    await queue.leave("a")
    assert await queue.live_workers() == 1


async def test_a_dead_worker_is_trimmed_beside_a_live_one(redis_server: RedisServer, redis_client: Redis) -> None:
    queue = JobQueue(redis_client, settings_for(redis_server))
    await queue.heartbeat("dead", 0.1)  # its last beat: live for 0.3 s
    await queue.heartbeat("alive", 30.0)
    await wait_for(lambda: _live_is(queue, 1))
    assert await redis_client.zrange(queue.workers_key(), 0, -1) == ["alive"]


async def _live_is(queue: JobQueue, count: int) -> bool:
    return await queue.live_workers() == count
