"""The queue's promises under faults, each against a real redis-server.

One job ends with one terminal event; reclaim reaches every orphan; a Redis blip
does not throw a generation away; a retried write never duplicates; admission
holds under a burst; a job from a newer gateway is served; bookkeeping does not
grow; deadlines are measured on Redis' clock.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from services.common.queue import Job, JobQueue, make_redis
from services.llm.config import Settings
from services.llm.engine import Generation, GenerationRequest, TokenCallback
from services.llm.worker import Worker
from tests.fixtures.engines import ScriptedEngine
from tests.fixtures.llm import all_events, events_until_end, make_job, metric, wait_for, worker_settings
from tests.fixtures.redis import RedisServer
from tests.fixtures.redis_proxy import RedisProxy

STREAM = "t:promises"


def make_settings(redis_server: RedisServer, **overrides: Any) -> Settings:
    return worker_settings(redis_server, STREAM, **{"llm_drain_seconds": 5.0, **overrides})


@pytest.fixture
async def workers(redis_client: Redis) -> AsyncIterator[list[tuple[Worker, asyncio.Task[None]]]]:
    started: list[tuple[Worker, asyncio.Task[None]]] = []
    yield started
    for worker, _task in started:
        worker.request_stop()
    await asyncio.gather(*(asyncio.wait_for(task, 15) for _, task in started), return_exceptions=True)


def run_worker(
    started: list[tuple[Worker, asyncio.Task[None]]], settings: Settings, engine: Any, redis: Redis, name: str
) -> Worker:
    worker = Worker(settings, engine, redis, name=name)
    started.append((worker, asyncio.create_task(worker.run())))
    return worker


# --- jobs from a newer gateway ------------------------------------------------------------------------------


async def test_a_job_with_fields_this_worker_does_not_know_is_answered(
    redis_server: RedisServer, redis_client: Redis, workers: list[tuple[Worker, asyncio.Task[None]]]
) -> None:
    settings = make_settings(redis_server)
    queue = JobQueue(redis_client, settings)
    job = make_job("from a newer gateway")
    await queue.ensure_group()
    newer = {**json.loads(job.encode()["job"]), "priority": 7, "tenant": "blue"}
    await redis_client.xadd(STREAM, {"job": json.dumps(newer)})
    run_worker(workers, settings, ScriptedEngine(), redis_client, "w1")

    events = await events_until_end(queue, job.id, within=5)
    assert [e.type for e in events] == ["done"]
    assert events[0].data["answer"] == "answer to: from a newer gateway"


async def test_a_job_that_cannot_be_read_but_names_its_id_gets_an_error_at_once(
    redis_server: RedisServer, redis_client: Redis, workers: list[tuple[Worker, asyncio.Task[None]]]
) -> None:
    settings = make_settings(redis_server)
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    await redis_client.xadd(STREAM, {"job": json.dumps({"id": "broken-1", "messages": 42})})
    run_worker(workers, settings, ScriptedEngine(), redis_client, "w1")

    events = await events_until_end(queue, "broken-1", within=5)
    assert [e.type for e in events] == ["error"]
    assert events[0].data["error"] == "generation_failed"
    assert "messages" in events[0].data["detail"]
    assert await redis_client.xlen(settings.llm_dead_letter_stream) == 1


# --- one terminal event per job -----------------------------------------------------------------------------


async def test_a_job_ends_with_one_terminal_event_when_a_live_try_is_given_up(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    """A's heartbeats lapsed: B claims the job, counts a try past the limit and dead-letters it while A
    is still generating. The caller must see one end, not an ``error`` followed by a ``done``."""
    settings = make_settings(redis_server, llm_max_tries=1)
    queue = JobQueue(redis_client, settings)
    job = make_job("who ends it?", stream=True)
    await queue.ensure_group()
    await queue.enqueue(job)
    [delivery] = await queue.read("a", count=1, block_ms=1000)
    slow = ScriptedEngine(delay=0.05)
    worker_a = Worker(settings, slow, redis_client, name="a")
    worker_b = Worker(settings, ScriptedEngine(), redis_client, name="b")

    generating = asyncio.create_task(worker_a._handle(delivery))
    await asyncio.wait_for(slow.started.wait(), 5)
    await worker_b._handle(delivery)
    await asyncio.wait_for(generating, 10)

    kinds = [e.type for e in await all_events(redis_client, queue, job.id)]
    assert [k for k in kinds if k != "token"] == ["error"], kinds
    assert await redis_client.xlen(settings.llm_dead_letter_stream) == 1


async def test_a_job_answered_already_is_not_generated_again(redis_server: RedisServer, redis_client: Redis) -> None:
    settings = make_settings(redis_server)
    queue = JobQueue(redis_client, settings)
    job = make_job("answered twice?")
    await queue.ensure_group()
    await queue.enqueue(job)
    [delivery] = await queue.read("a", count=1, block_ms=1000)
    first, second = ScriptedEngine(), ScriptedEngine()
    await Worker(settings, first, redis_client, name="a")._handle(delivery)
    await Worker(settings, second, redis_client, name="b")._handle(delivery)  # a late duplicate delivery

    assert len(first.calls) == 1
    assert second.calls == []


# --- reclaim reaches every orphan ---------------------------------------------------------------------------


async def test_orphans_behind_many_live_jobs_are_reclaimed(
    redis_server: RedisServer, redis_client: Redis, workers: list[tuple[Worker, asyncio.Task[None]]]
) -> None:
    """20 entries of a live worker (heartbeats keep them fresh) in front of 5 of a dead one."""
    settings = make_settings(redis_server, llm_concurrency=1, llm_visibility_timeout_seconds=0.5)
    queue = JobQueue(redis_client, settings)
    live_jobs = [make_job(f"live {i}") for i in range(20)]
    orphans = [make_job(f"orphan {i}") for i in range(5)]
    await queue.ensure_group()
    for job in [*live_jobs, *orphans]:
        await queue.enqueue(job)
    live = await queue.read("live", count=20, block_ms=1000)
    dead = await queue.read("dead", count=5, block_ms=1000)
    assert len(live) == 20 and len(dead) == 5

    async def heartbeat() -> None:
        while True:
            await queue.keep("live", [d.message_id for d in live])
            await asyncio.sleep(0.05)

    beating = asyncio.create_task(heartbeat())
    try:
        run_worker(workers, settings, ScriptedEngine(), redis_client, "rescuer")
        for job in orphans:
            events = await events_until_end(queue, job.id, within=20)
            assert events[-1].type == "done"
    finally:
        beating.cancel()
    pending = await redis_client.xpending_range(STREAM, settings.llm_group, "-", "+", 100)
    assert {p["consumer"] for p in pending} == {"live"}  # live work was never taken away


# --- a Redis blip does not throw away a generation ----------------------------------------------------------


class BlipsMidAnswer(ScriptedEngine):
    """Cuts the worker off from Redis for ``seconds`` after its first token."""

    def __init__(self, proxy: RedisProxy, seconds: float) -> None:
        super().__init__()
        self.proxy, self.seconds = proxy, seconds

    async def generate(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> Generation:
        async def cut_after_first(text: str) -> None:
            assert on_token is not None
            await on_token(text)
            if text == "answer":
                self.proxy.blip(self.seconds)

        return await super().generate(request, cut_after_first if on_token else None)


async def test_a_redis_blip_while_publishing_keeps_the_generation(
    redis_server: RedisServer,
    redis_client: Redis,
    redis_proxy: RedisProxy,
    workers: list[tuple[Worker, asyncio.Task[None]]],
) -> None:
    settings = make_settings(redis_server, llm_visibility_timeout_seconds=30.0)
    queue = JobQueue(redis_client, settings)
    job = make_job("through a failover", stream=True)
    await queue.ensure_group()
    await queue.enqueue(job)
    engine = BlipsMidAnswer(redis_proxy, seconds=1.0)
    proxied = make_redis(make_settings(redis_server, redis_url=redis_proxy.url))
    try:
        run_worker(workers, settings, engine, proxied, "w1")
        events = await events_until_end(queue, job.id, within=15)  # far less than the visibility timeout
        assert events[-1].type == "done"
        assert events[-1].attempt == 1
        assert len(engine.calls) == 1
        tokens = "".join(e.data["text"] for e in events if e.type == "token")
        assert tokens == events[-1].data["answer"] == "answer to: through a failover"
    finally:
        for worker, task in workers:
            worker.request_stop()
            await asyncio.wait_for(task, 15)
        await proxied.aclose()


# --- retries that never duplicate ---------------------------------------------------------------------------


async def test_an_enqueue_whose_reply_is_lost_adds_one_job(
    redis_server: RedisServer, redis_client: Redis, redis_proxy: RedisProxy
) -> None:
    settings = make_settings(redis_server)
    proxied = make_redis(make_settings(redis_server, redis_url=redis_proxy.url))
    try:
        queue = JobQueue(proxied, settings)
        await queue.ensure_group()
        job = make_job("sent once")
        redis_proxy.drop_reply(job.id.encode())
        await queue.enqueue(job)
        assert redis_proxy.dropped == 1
        assert await redis_client.xlen(STREAM) == 1
    finally:
        await proxied.aclose()


async def test_a_hand_back_whose_reply_is_lost_puts_the_job_back_once(
    redis_server: RedisServer, redis_client: Redis, redis_proxy: RedisProxy
) -> None:
    settings = make_settings(redis_server)
    proxied = make_redis(make_settings(redis_server, redis_url=redis_proxy.url))
    try:
        queue = JobQueue(proxied, settings)
        await queue.ensure_group()
        job = make_job("handed back once")
        await queue.enqueue(job)
        deliveries = await queue.read("leaving", count=1, block_ms=1000)
        redis_proxy.drop_reply(job.id.encode())
        await queue.hand_back(deliveries)
        assert redis_proxy.dropped == 1
        assert await redis_client.xlen(STREAM) == 1
        assert (await redis_client.xpending(STREAM, settings.llm_group))["pending"] == 0
    finally:
        await proxied.aclose()


@pytest.mark.parametrize("lost", ["token", "try"])
async def test_a_worker_write_whose_reply_is_lost_counts_once(
    redis_server: RedisServer,
    redis_client: Redis,
    redis_proxy: RedisProxy,
    workers: list[tuple[Worker, asyncio.Task[None]]],
    lost: str,
) -> None:
    """The first token's reply, or the reply to the write that counts the try, never reaches the worker."""
    settings = make_settings(redis_server, llm_max_tries=1)
    queue = JobQueue(redis_client, settings)
    job = make_job("counted once", stream=True)
    await queue.ensure_group()
    await queue.enqueue(job)
    redis_proxy.drop_reply(b'{"text":"answer"}' if lost == "token" else job.id.encode())
    proxied = make_redis(make_settings(redis_server, redis_url=redis_proxy.url))
    try:
        run_worker(workers, settings, ScriptedEngine(), proxied, "w1")
        events = await events_until_end(queue, job.id, within=10)
        assert redis_proxy.dropped == 1
        assert [e.type for e in events][-1] == "done", events[-1]
        tokens = [e.data["text"] for e in events if e.type == "token"]
        assert "".join(tokens) == events[-1].data["answer"] == "answer to: counted once"
    finally:
        for worker, task in workers:
            worker.request_stop()
            await asyncio.wait_for(task, 15)
        await proxied.aclose()


# --- no growing bookkeeping ---------------------------------------------------------------------------------


async def _keys_without_expiry(redis: Redis, *keep: str) -> list[str]:
    keys = [key async for key in redis.scan_iter(match=f"{STREAM}*")]
    return sorted([key for key in keys if key not in keep and await redis.ttl(key) < 0])


async def test_bookkeeping_expires_while_a_job_runs_and_is_cleared_when_it_ends(
    redis_server: RedisServer, redis_client: Redis, workers: list[tuple[Worker, asyncio.Task[None]]]
) -> None:
    settings = make_settings(redis_server)
    queue = JobQueue(redis_client, settings)
    engine = ScriptedEngine(fail_times=1, delay=0.2)  # the first try fails, the second answers slowly
    job = make_job("leave nothing behind", stream=True)
    await queue.ensure_group()
    await queue.enqueue(job)
    run_worker(workers, settings, engine, redis_client, "w1")
    await wait_for(lambda: _true(len(engine.calls) == 2))

    # In flight after a failed try: every key but the two streams expires by itself.
    assert await _keys_without_expiry(redis_client, STREAM, settings.llm_dead_letter_stream) == []
    assert (await events_until_end(queue, job.id))[-1].type == "done"
    # Ended: only what the caller reads (its events, the answered mark) is left, and it expires; beside it
    # the running worker's heartbeat, which expires too.
    leftovers = [key async for key in redis_client.scan_iter(match=f"{STREAM}:*")]
    expected = [queue.events_key(job.id), queue.answered_key(job.id), queue.workers_key()]
    assert sorted(leftovers) == sorted(expected)
    assert await _keys_without_expiry(redis_client, STREAM, settings.llm_dead_letter_stream) == []


async def test_the_dead_letter_stream_is_capped_and_what_is_trimmed_is_counted(
    redis_server: RedisServer, redis_client: Redis, workers: list[tuple[Worker, asyncio.Task[None]]]
) -> None:
    settings = make_settings(redis_server, llm_dead_letter_max_len=3, llm_concurrency=1)  # one at a time: in order
    queue = JobQueue(redis_client, settings)
    trimmed = metric("rag_llm_dead_letters_trimmed_total")
    jobs = [make_job(f"doomed {i}") for i in range(5)]
    await queue.ensure_group()
    for job in jobs:
        await queue.enqueue(job)
    run_worker(workers, settings, ScriptedEngine(fail_times=100, retryable=False), redis_client, "w1")
    for job in jobs:
        assert (await events_until_end(queue, job.id))[-1].type == "error"

    dead = await redis_client.xrange(settings.llm_dead_letter_stream)
    assert len(dead) == 3, [Job.decode(fields).id for _, fields in dead]
    assert [Job.decode(fields).id for _, fields in dead] == [job.id for job in jobs[2:]]  # the newest kept
    assert metric("rag_llm_dead_letters_trimmed_total") == trimmed + 2


# --- time from one clock ------------------------------------------------------------------------------------


@pytest.mark.parametrize("skew", [3600.0, -3600.0], ids=["worker-clock-ahead", "worker-clock-behind"])
async def test_deadlines_are_measured_on_redis_clock_not_the_workers(
    redis_server: RedisServer,
    redis_client: Redis,
    workers: list[tuple[Worker, asyncio.Task[None]]],
    monkeypatch: pytest.MonkeyPatch,
    skew: float,
) -> None:
    settings = make_settings(redis_server)
    queue = JobQueue(redis_client, settings)
    live = make_job("still wanted", ttl=30.0)
    spent = make_job("given up", ttl=0.2)
    await queue.ensure_group()
    await queue.enqueue(spent)
    await queue.enqueue(live)
    enqueued = _ms(await redis_client.time())
    await wait_for(lambda: _redis_ms_past(redis_client, enqueued + 300))  # the spent job's budget is over

    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + skew)  # the worker's clock is off by an hour
    engine = ScriptedEngine()
    run_worker(workers, settings, engine, redis_client, "w1")

    assert (await events_until_end(queue, live.id))[-1].type == "done"
    assert [call.messages[-1]["content"] for call in engine.calls] == ["still wanted"]


def _ms(reply: tuple[int, int]) -> int:
    return int(reply[0]) * 1000 + int(reply[1]) // 1000


async def _redis_ms_past(redis: Redis, ms: int) -> bool:
    return _ms(await redis.time()) > ms


async def _true(value: bool) -> bool:
    return value
