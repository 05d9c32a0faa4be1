"""Real worker processes on a real Redis, bridging to the real model server: crashes, drains, dead letters.

Jobs are enqueued here exactly as the gateway enqueues them, on a stream of
each test's own; tests/queue/test_gateway_processes.py goes through the
gateway. Workers run ``RAG_LLM_BACKEND=openai`` against ``python -m
services.llm.server`` (tests/fixtures/llm.py), the same code path as against
vLLM on a GPU.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from ragpod.processes import free_port
from services.common.queue import Job, JobQueue
from services.llm.config import Settings
from tests.fixtures.llm import (
    LlmServer,
    WorkerProc,
    all_events,
    events_until_end,
    queue_is_empty,
    queue_names,
    start_llm_server,
    start_worker,
    start_workers,
    wait_for,
)
from tests.fixtures.redis import RedisServer

pytestmark = pytest.mark.slow

# A question the small model answers at length: generation outlasts the few hundred ms the tests need.
COUNT = [{"role": "user", "content": "Count from 1 to 50, separated by commas."}]


def queue_for(redis: Redis, stream: str) -> JobQueue:
    return JobQueue(redis, Settings(**queue_names(stream)))


def job(*, ttl: float = 120.0, max_tokens: int = 16, stream: bool = True) -> Job:
    return Job(messages=COUNT, deadline=time.time() + ttl, stream=stream, max_tokens=max_tokens)


async def first_token(queue: JobQueue, job_id: str, within: float = 60.0) -> None:
    async with asyncio.timeout(within):
        async for event in queue.events(job_id, block_ms=100):
            if event.type == "token":
                return
            raise AssertionError(f"expected a token first, got {event}")


def stop_all(workers: list[WorkerProc]) -> None:
    for worker in workers:
        worker.proc.stop()


async def test_kill_9_while_generating_another_worker_answers_once(
    redis_server: RedisServer, redis_client: Redis, llm_server: LlmServer, tmp_path: Path
) -> None:
    stream = "t:kill"
    queue = queue_for(redis_client, stream)
    extra = {"RAG_LLM_VISIBILITY_TIMEOUT_SECONDS": "2", "RAG_LLM_CONCURRENCY": "1"}
    workers = start_workers(2, redis_server.url, stream, llm_server.url, tmp_path, extra)
    try:
        question = job(max_tokens=12)
        await queue.enqueue(question)
        await first_token(queue, question.id)  # it is generating now

        pending = await redis_client.xpending_range(stream, queue.group, "-", "+", 10)
        assert len(pending) == 1
        victim = next(w for w in workers if w.consumer() == pending[0]["consumer"])
        survivor = next(w for w in workers if w is not victim)
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.proc.popen.wait(120) == -signal.SIGKILL

        events = await events_until_end(queue, question.id, within=120)
        done = events[-1]
        assert done.type == "done"
        assert done.data["worker"] == survivor.consumer()
        assert done.attempt == 2
        assert done.data["answer"]
        # The answer's own tokens join to it; the dead worker's partial tokens carry attempt 1.
        assert (
            "".join(e.data["text"] for e in events if e.type == "token" and e.attempt == 2).strip()
            == (done.data["answer"])
        )
        await wait_for(lambda: queue_is_empty(redis_client, stream, queue.group))
        assert await redis_client.exists(queue.job_key(question.id)) == 0  # its bookkeeping is gone
        assert survivor.metric("rag_llm_jobs_reclaimed_total") == 1
        await asyncio.sleep(0.5)  # nothing else arrives: one answer only
        assert [e.type for e in await all_events(redis_client, queue, question.id)].count("done") == 1
    finally:
        stop_all(workers)


async def test_sigterm_finishes_jobs_in_flight_acknowledges_and_exits_0(
    redis_server: RedisServer, redis_client: Redis, llm_server: LlmServer, tmp_path: Path
) -> None:
    stream = "t:drain"
    queue = queue_for(redis_client, stream)
    extra = {"RAG_LLM_CONCURRENCY": "2", "RAG_LLM_DRAIN_SECONDS": "120"}
    worker = start_worker(redis_server.url, stream, llm_server.url, tmp_path, extra)
    try:
        jobs = [job(max_tokens=8), job(max_tokens=8)]
        async with redis_client.pipeline(transaction=True) as pipe:  # read together, generated together
            for item in jobs:
                pipe.xadd(stream, item.encode())  # type: ignore[arg-type]
            await pipe.execute()

        async def generating() -> bool:
            kinds = [e.type for item in jobs for e in await all_events(redis_client, queue, item.id)]
            return "token" in kinds and "done" not in kinds

        await wait_for(generating, within=60)
        pending = await redis_client.xpending(stream, queue.group)
        assert pending["pending"] == 2  # both in flight: one generating, the other generating or next in line

        signalled_ms = time.time() * 1000
        worker.proc.popen.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.proc.popen.wait, 120) == 0

        for item in jobs:
            entries = await redis_client.xrange(queue.events_key(item.id))
            kinds = [fields["type"] for _, fields in entries]
            assert kinds.count("done") == 1 and kinds[-1] == "done"
            done_id = entries[-1][0]
            assert int(done_id.split("-")[0]) > signalled_ms  # finished after the signal: drained, not dropped
        assert await queue_is_empty(redis_client, stream, queue.group)
        assert await redis_client.xinfo_consumers(stream, queue.group) == []  # left the group cleanly
        assert await redis_client.exists(*(queue.job_key(item.id) for item in jobs)) == 0
    finally:
        worker.proc.stop()


async def test_failing_job_is_dead_lettered_and_an_expired_one_never_generated(
    redis_server: RedisServer, redis_client: Redis, llm_server: LlmServer, tmp_path: Path
) -> None:
    """A request the model server refuses (400: more new tokens than it allows) cannot succeed: one try."""
    stream = "t:fail-400"
    queue = queue_for(redis_client, stream)
    tries, words = 1, "model server answered 400"
    worker = start_worker(redis_server.url, stream, llm_server.url, tmp_path, {"RAG_LLM_MAX_TRIES": "2"})
    try:
        expired, failing = job(ttl=-1.0), job(max_tokens=9000)
        await queue.enqueue(expired)  # if it were generated, it would fail and be dead-lettered too
        await queue.enqueue(failing)

        events = await events_until_end(queue, failing.id, within=30)
        assert [e.type for e in events] == ["error"]
        assert events[0].data["error"] == "generation_failed"
        assert words in events[0].data["detail"]

        await wait_for(lambda: queue_is_empty(redis_client, stream, queue.group))
        dead = await redis_client.xrange(queue.dead_letter_stream)
        assert [Job.decode(fields).id for _, fields in dead] == [failing.id]
        assert words in dead[0][1]["error"]
        assert dead[0][1]["tries"] == str(tries)
        assert await all_events(redis_client, queue, expired.id) == []
        assert worker.metric("rag_llm_jobs_dropped_deadline_total") == 1
        assert worker.metric("rag_llm_jobs_retried_total") == tries - 1
        assert worker.metric("rag_llm_jobs_dead_lettered_total") == 1
        assert worker.metric("rag_llm_tokens_generated_total") == 0
    finally:
        worker.proc.stop()


async def test_second_signal_exits_at_once_and_another_worker_takes_the_job(
    redis_server: RedisServer, redis_client: Redis, llm_server: LlmServer, tmp_path: Path
) -> None:
    stream = "t:twice"
    queue = queue_for(redis_client, stream)
    extra = {"RAG_LLM_VISIBILITY_TIMEOUT_SECONDS": "2", "RAG_LLM_CONCURRENCY": "1", "RAG_LLM_DRAIN_SECONDS": "120"}
    workers = start_workers(2, redis_server.url, stream, llm_server.url, tmp_path, extra)
    try:
        question = job(max_tokens=16)
        await queue.enqueue(question)
        await first_token(queue, question.id)
        pending = await redis_client.xpending_range(stream, queue.group, "-", "+", 10)
        owner = next(w for w in workers if w.consumer() == pending[0]["consumer"])
        other = next(w for w in workers if w is not owner)

        owner.proc.popen.send_signal(signal.SIGTERM)  # drain: would wait up to 120 s for the job
        await asyncio.sleep(0.1)
        assert owner.proc.alive()
        owner.proc.popen.send_signal(signal.SIGTERM)  # the second: out now, the job left to the others
        assert await asyncio.to_thread(owner.proc.popen.wait, 10) == 1  # not the 120 s drain

        events = await events_until_end(queue, question.id, within=120)
        assert events[-1].type == "done"
        assert events[-1].data["worker"] == other.consumer()
        await wait_for(lambda: queue_is_empty(redis_client, stream, queue.group))
    finally:
        stop_all(workers)


async def test_worker_started_before_its_model_server_waits_and_a_refused_call_is_not_a_try(
    redis_server: RedisServer, redis_client: Redis, tmp_path: Path
) -> None:
    """As on a GPU node while vLLM loads, and when vLLM restarts: one try per job, and no job is lost."""
    stream = "t:cold"
    queue = queue_for(redis_client, stream)
    port = free_port()
    extra = {"RAG_LLM_MAX_TRIES": "1", "RAG_LLM_CONCURRENCY": "4"}
    worker = start_worker(redis_server.url, stream, f"http://127.0.0.1:{port}/v1", tmp_path, extra)
    server = None
    try:
        # Budgets long enough for a model server that loads slowly on a busy machine.
        jobs = [job(ttl=900.0, max_tokens=4, stream=False) for _ in range(6)]
        for item in jobs:
            await queue.enqueue(item)
        await asyncio.sleep(3.0)  # the worker asks its engine several times meanwhile
        assert await queue.depth() == 6  # not one job read while nothing serves the model
        assert worker.metric("rag_llm_engine_ready") == 0
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{worker.port}/readyz", timeout=5)).status_code == 503

        server = await asyncio.to_thread(start_llm_server, port, tmp_path)
        for item in jobs:
            events = await events_until_end(queue, item.id, within=300)
            assert [e.type for e in events] == ["done"]
            assert events[0].attempt == 1
        assert worker.metric("rag_llm_engine_ready") == 1

        # The model server goes away while the worker thinks it ready: the job it reads meets a closed
        # port. With one try allowed, counting that would dead-letter it; it waits for the server instead.
        server.proc.stop()
        server = None
        late = job(ttl=900.0, max_tokens=4, stream=False)
        await queue.enqueue(late)
        await wait_for(lambda: _true(worker.metric("rag_llm_jobs_untried_total") >= 1), within=30)
        assert worker.metric("rag_llm_engine_ready") == 0
        await asyncio.sleep(1.0)
        assert await queue.depth() == 1  # back in the queue, not read again while the server is down

        server = await asyncio.to_thread(start_llm_server, port, tmp_path)
        events = await events_until_end(queue, late.id, within=300)
        assert [e.type for e in events] == ["done"]
        assert events[0].attempt == 1  # the refused call took none of its tries

        assert await redis_client.xlen(queue.dead_letter_stream) == 0
        assert worker.metric("rag_llm_jobs_dead_lettered_total") == 0
        assert worker.metric("rag_llm_jobs_retried_total") == 0
        await wait_for(lambda: queue_is_empty(redis_client, stream, queue.group))
    finally:
        worker.proc.stop()
        if server is not None:
            server.proc.stop()


async def _true(value: bool) -> bool:
    return value
