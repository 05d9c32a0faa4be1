"""The worker against a real Redis, with the scripted engine: deadlines, retries, dead letters, one answer, drain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.common.embedding import EmbeddingClient
from services.common.http import ServiceClient
from services.common.queue import Job, JobQueue
from services.common.schemas import SearchResponse, Source
from services.gateway.config import Settings as GatewaySettings
from services.gateway.pipeline import Answer, Clients, Pending, Question, Reset, Retrieved, Token
from services.llm.config import Settings
from services.llm.engine import Generation, GenerationRequest, TokenCallback
from services.llm.worker import Worker
from tests.fixtures.embedding import EmbeddingDouble
from tests.fixtures.engines import ScriptedEngine
from tests.fixtures.llm import all_events, events_until_end, make_job, metric, wait_for, worker_settings
from tests.fixtures.llm import queue_is_empty as _queue_is_empty
from tests.fixtures.redis import RedisServer

STREAM = "t:worker"


def make_settings(redis_server: RedisServer, **overrides: Any) -> Settings:
    return worker_settings(redis_server, STREAM, **overrides)


async def queue_is_empty(redis: Redis, settings: Settings) -> bool:
    return await _queue_is_empty(redis, settings.llm_stream, settings.llm_group)


class Running:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.task = asyncio.create_task(worker.run())

    async def stop(self) -> None:
        self.worker.request_stop()
        await asyncio.wait_for(self.task, 15.0)


@pytest.fixture
async def running(redis_client: Redis) -> AsyncIterator[list[Running]]:
    """Workers started by a test, stopped at its end whatever happened."""
    workers: list[Running] = []
    yield workers
    for item in workers:
        if not item.task.done():
            await item.stop()


def start(running: list[Running], settings: Settings, engine: Any, redis: Redis, name: str) -> Running:
    item = Running(Worker(settings, engine, redis, name=name))
    running.append(item)
    return item


async def test_expired_job_is_dropped_without_generating(
    redis_server: RedisServer, redis_client: Redis, running: list[Running]
) -> None:
    settings = make_settings(redis_server)
    queue = JobQueue(redis_client, settings)
    engine = ScriptedEngine()
    dropped = metric("rag_llm_jobs_dropped_deadline_total")
    expired = make_job(ttl=-1.0)
    live = make_job("still wanted")
    await queue.ensure_group()
    await queue.enqueue(expired)
    await queue.enqueue(live)
    start(running, settings, engine, redis_client, "w1")

    done = await events_until_end(queue, live.id)
    assert done[-1].type == "done"
    await wait_for(lambda: queue_is_empty(redis_client, settings))
    # Only the live job reached the engine; the expired one was acknowledged, never answered.
    assert [call.messages[-1]["content"] for call in engine.calls] == ["still wanted"]
    assert metric("rag_llm_jobs_dropped_deadline_total") == dropped + 1
    assert await redis_client.exists(queue.events_key(expired.id)) == 0
    assert await redis_client.exists(queue.job_key(expired.id), queue.job_key(live.id)) == 0  # no bookkeeping left


async def test_deadline_passing_during_generation_stops_it(
    redis_server: RedisServer, redis_client: Redis, running: list[Running]
) -> None:
    settings = make_settings(redis_server)
    queue = JobQueue(redis_client, settings)
    engine = ScriptedEngine(delay=3600.0)  # would never finish: only the deadline can end it
    dropped = metric("rag_llm_jobs_dropped_deadline_total")
    await queue.ensure_group()
    start(running, settings, engine, redis_client, "w1")
    await wait_for(lambda: _someone_reading(redis_client))  # blocked on the stream: the job starts at once
    job = make_job(ttl=3.0)
    await queue.enqueue(job)

    await asyncio.wait_for(engine.started.wait(), 3.0)  # generating while the job was still live
    await wait_for(lambda: queue_is_empty(redis_client, settings))
    assert len(engine.calls) == 1
    assert metric("rag_llm_jobs_dropped_deadline_total") == dropped + 1
    assert await all_events(redis_client, queue, job.id) == []


@pytest.mark.parametrize(("retryable", "calls"), [(True, 3), (False, 1)], ids=["retryable", "permanent"])
async def test_failing_job_is_dead_lettered_and_its_caller_told(
    redis_server: RedisServer, redis_client: Redis, running: list[Running], retryable: bool, calls: int
) -> None:
    settings = make_settings(redis_server, llm_max_tries=3)
    queue = JobQueue(redis_client, settings)
    engine = ScriptedEngine(fail_times=100, retryable=retryable)
    retried = metric("rag_llm_jobs_retried_total")
    dead = metric("rag_llm_jobs_dead_lettered_total")
    job = make_job()
    await queue.ensure_group()
    await queue.enqueue(job)
    start(running, settings, engine, redis_client, "w1")

    events = await events_until_end(queue, job.id)
    assert [e.type for e in events] == ["error"]
    assert events[0].data == {"error": "generation_failed", "detail": f"scripted failure {calls}"}
    assert len(engine.calls) == calls

    entries = await redis_client.xrange(settings.llm_dead_letter_stream)
    assert len(entries) == 1
    fields = entries[0][1]
    assert Job.decode(fields).id == job.id
    assert fields["error"] == f"scripted failure {calls}"
    assert fields["tries"] == str(calls)
    await wait_for(lambda: queue_is_empty(redis_client, settings))
    assert await redis_client.exists(queue.job_key(job.id)) == 0  # its bookkeeping is gone
    assert metric("rag_llm_jobs_retried_total") == retried + calls - 1
    assert metric("rag_llm_jobs_dead_lettered_total") == dead + 1


async def test_retryable_failure_then_success_answers_once(
    redis_server: RedisServer, redis_client: Redis, running: list[Running]
) -> None:
    settings = make_settings(redis_server)
    queue = JobQueue(redis_client, settings)
    engine = ScriptedEngine(fail_times=1, retryable=True)
    job = make_job("second time lucky", stream=True)
    await queue.ensure_group()
    await queue.enqueue(job)
    start(running, settings, engine, redis_client, "w1")

    events = await events_until_end(queue, job.id)
    assert events[-1].type == "done"
    assert events[-1].attempt == 2
    assert events[-1].data["answer"] == "answer to: second time lucky"
    assert {e.attempt for e in events} == {2}  # the failed first try published nothing
    assert len(engine.calls) == 2
    await wait_for(lambda: queue_is_empty(redis_client, settings))
    assert await redis_client.xlen(settings.llm_dead_letter_stream) == 0


class SaysOtherwise(ScriptedEngine):
    """Answers another text than ScriptedEngine, so a test can tell whose tokens it sees."""

    async def generate(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> Generation:
        content = request.messages[-1]["content"] + "\nfrom the second worker"
        changed = GenerationRequest([*request.messages[:-1], {"role": "user", "content": content}], request.max_tokens)
        return await super().generate(changed, on_token)


async def test_two_workers_finishing_one_job_answer_it_once(redis_server: RedisServer, redis_client: Redis) -> None:
    settings = make_settings(redis_server)
    queue = JobQueue(redis_client, settings)
    first, second = ScriptedEngine(delay=0.01), SaysOtherwise(delay=0.05)
    job = make_job("who answers?", stream=True)
    await queue.ensure_group()
    await queue.enqueue(job)
    [delivery] = await queue.read("a", count=1, block_ms=1000)

    # The job's first worker looked dead, so another claimed it; both generate at once.
    worker_a = Worker(settings, first, redis_client, name="a")
    worker_b = Worker(settings, second, redis_client, name="b")
    await asyncio.gather(worker_a._handle(delivery), worker_b._handle(delivery))

    assert len(first.calls) == len(second.calls) == 1
    events = await all_events(redis_client, queue, job.id)
    dones = [e for e in events if e.type == "done"]
    assert len(dones) == 1  # only the first to finish answers
    assert dones[0].data["answer"] in ("answer to: who answers?", "answer to: from the second worker")
    # The other attempt stopped at its first token after the answer: fewer tokens than its words.
    loser, words = (2, 6) if dones[0].attempt == 1 else (1, 4)
    assert len([e for e in events if e.type == "token" and e.attempt == loser]) < words
    assert await queue_is_empty(redis_client, settings)

    # The caller's stream shows one attempt's tokens, and they join to the answer it gets.
    # A source that holds either answer, and no floors: the model's own answer passes the check and is given.
    source = Source(
        document_id="d",
        chunk=0,
        score=1.0,
        text="answer to: who answers? answer to: from the second worker",
        metadata={},
    )
    search = SearchResponse(hits=[], embed_ms=1, search_ms=1)
    retrieved = Retrieved(search, [source], started=0.0, deadline=job.deadline)
    retriever = ServiceClient("retriever", "http://retriever", 5, transport=httpx.MockTransport(_unused))
    embedding = EmbeddingClient(
        ServiceClient("embedding", "http://embedding", 5, transport=EmbeddingDouble().transport())
    )
    pending = Pending(
        Question("who answers?", 1, stream=True),
        retrieved,
        GatewaySettings(**_queue_names(settings), min_support=0.0, min_question_support=0.0),
        Clients(retriever, embedding, queue),
        "request-1",
        job=job,
    )
    shown: list[str] = []
    answers: list[Answer] = []
    try:
        async with asyncio.timeout(5):
            async for item in pending.stream():
                if isinstance(item, Reset):
                    shown.clear()
                elif isinstance(item, Token):
                    shown.append(item.text)
                else:
                    answers.append(item)
    finally:
        await retriever.aclose()
        await embedding.aclose()
    assert len(answers) == 1 and answers[0].response.answer_kind == "generated"
    assert "".join(shown).strip() == answers[0].response.answer == dones[0].data["answer"]


def _unused(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"the stream called {request.url}")


def _queue_names(settings: Settings) -> dict[str, str]:
    return {"llm_stream": settings.llm_stream, "llm_group": settings.llm_group}


class Counting(ScriptedEngine):
    """Records how many generations run at once."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay=delay)
        self.now = 0
        self.most = 0

    async def generate(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> Generation:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            return await super().generate(request, on_token)
        finally:
            self.now -= 1


async def test_jobs_in_flight_are_bounded_and_handed_over_together(
    redis_server: RedisServer, redis_client: Redis, running: list[Running]
) -> None:
    settings = make_settings(redis_server, llm_concurrency=3)
    queue = JobQueue(redis_client, settings)
    engine = Counting(delay=0.02)
    jobs = [make_job(f"question {i}") for i in range(7)]
    await queue.ensure_group()
    for job in jobs:
        await queue.enqueue(job)
    start(running, settings, engine, redis_client, "w1")

    for job in jobs:
        assert (await events_until_end(queue, job.id))[-1].type == "done"
    assert engine.most == 3  # never more than RAG_LLM_CONCURRENCY, and that many together
    assert len(engine.calls) == 7


async def test_stop_drains_jobs_in_flight_then_leaves_the_group(
    redis_server: RedisServer, redis_client: Redis, running: list[Running]
) -> None:
    settings = make_settings(redis_server, llm_concurrency=2, llm_drain_seconds=10.0)
    queue = JobQueue(redis_client, settings)
    # About two and a half seconds per job: still pending when the stop comes and when the worker first
    # leaves (its read waits at most a second), so only the leave after the drain takes it out of the group.
    engine = ScriptedEngine(delay=0.5)
    jobs = [make_job("first"), make_job("second")]
    await queue.ensure_group()
    for job in jobs:
        await queue.enqueue(job)
    item = start(running, settings, engine, redis_client, "w1")
    await wait_for(lambda: _true(len(engine.calls) == 2))

    await item.stop()
    for job in jobs:  # finished and answered after the stop, not abandoned
        assert [e.type for e in await all_events(redis_client, queue, job.id)][-1] == "done"
    assert await queue_is_empty(redis_client, settings)
    assert await redis_client.xinfo_consumers(settings.llm_stream, settings.llm_group) == []


async def test_drain_timeout_leaves_the_job_for_another_worker(
    redis_server: RedisServer, redis_client: Redis, running: list[Running]
) -> None:
    settings = make_settings(redis_server, llm_drain_seconds=0.1, llm_visibility_timeout_seconds=0.5)
    queue = JobQueue(redis_client, settings)
    slow = ScriptedEngine(delay=1.0)
    job = make_job("too slow to drain")
    await queue.ensure_group()
    await queue.enqueue(job)
    item = start(running, settings, slow, redis_client, "slow")
    await asyncio.wait_for(slow.started.wait(), 5)
    await item.stop()

    pending = await redis_client.xpending_range(settings.llm_stream, settings.llm_group, "-", "+", 10)
    assert [p["consumer"] for p in pending] == ["slow"]  # not acknowledged: someone else will claim it
    reclaimed = metric("rag_llm_jobs_reclaimed_total")
    fast = ScriptedEngine()
    start(running, settings, fast, redis_client, "fast")
    events = await events_until_end(queue, job.id)
    assert events[-1].type == "done"
    assert events[-1].data["worker"] == "fast"
    assert events[-1].attempt == 2  # the abandoned try counted
    assert metric("rag_llm_jobs_reclaimed_total") == reclaimed + 1
    await wait_for(lambda: queue_is_empty(redis_client, settings))


async def test_jobs_read_after_the_stop_are_handed_back(
    redis_server: RedisServer, redis_client: Redis, running: list[Running]
) -> None:
    settings = make_settings(redis_server)
    queue = JobQueue(redis_client, settings)
    stopping = ScriptedEngine()
    job = make_job("read while stopping")
    await queue.ensure_group()
    await queue.enqueue(job)
    worker = Worker(settings, stopping, redis_client, name="stopping")
    worker.request_stop()
    await worker._turn()  # reads the job, sees the stop, gives it back

    assert stopping.calls == []
    summary = await redis_client.xpending(settings.llm_stream, settings.llm_group)
    assert summary["pending"] == 0 and await redis_client.xlen(settings.llm_stream) == 1
    other = ScriptedEngine()
    start(running, settings, other, redis_client, "other")
    events = await events_until_end(queue, job.id)
    assert events[-1].type == "done" and events[-1].data["worker"] == "other"


async def _true(value: bool) -> bool:
    return value


async def _someone_reading(redis: Redis) -> bool:
    """A client is blocked in XREADGROUP: a worker waiting for the next job."""
    return any(client.get("cmd") == "xreadgroup" for client in await redis.client_list())


async def test_a_dead_workers_jobs_keep_their_place_before_jobs_admitted_after_them(
    redis_server: RedisServer, redis_client: Redis, running: list[Running]
) -> None:
    settings = make_settings(redis_server, llm_concurrency=1, llm_visibility_timeout_seconds=0.5)
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    orphans = [make_job(f"orphan {n}") for n in range(3)]
    later = [make_job(f"later {n}") for n in range(3)]
    for job in orphans:
        await queue.enqueue(job)
    # A worker takes the first three and dies (kill -9): they stay pending under its name.
    assert len(await queue.read("killed", count=3, block_ms=100)) == 3
    for job in later:
        await queue.enqueue(job)
    await asyncio.sleep(0.6)  # past the visibility timeout
    engine = ScriptedEngine()
    start(running, settings, engine, redis_client, "survivor")
    for job in [*orphans, *later]:
        assert (await events_until_end(queue, job.id, within=20))[-1].type == "done"
    order = [call.messages[-1]["content"] for call in engine.calls]
    assert order == [*(f"orphan {n}" for n in range(3)), *(f"later {n}" for n in range(3))]


async def test_streamed_tokens_go_out_in_batches_in_order_when_redis_is_slow(
    redis_server: RedisServer, redis_client: Redis, running: list[Running]
) -> None:
    settings = make_settings(redis_server)
    queue = JobQueue(redis_client, settings)
    await queue.ensure_group()
    worker = start(running, settings, ScriptedEngine(delay=0.01), redis_client, "batching").worker
    publish = worker.queue.publish_tokens
    batches: list[int] = []

    async def slow_publish(job_id: str, attempt: int, first_seq: int, texts: list[str]) -> bool:
        batches.append(len(texts))
        await asyncio.sleep(0.25)  # a round trip to a distant Redis
        return await publish(job_id, attempt, first_seq, texts)

    worker.queue.publish_tokens = slow_publish  # type: ignore[method-assign]
    job = make_job(" ".join(f"w{n}" for n in range(30)), stream=True)
    await queue.enqueue(job)
    events = await events_until_end(queue, job.id, within=30)
    tokens = [e.data["text"] for e in events if e.type == "token"]
    assert events[-1].type == "done" and "".join(tokens) == events[-1].data["answer"]
    assert sum(batches) == len(tokens) == 32
    assert len(batches) <= len(tokens) // 4, batches  # one round trip per token would be 32


@pytest.mark.parametrize("loop", ["abandon_notices", "depth", "keep", "heartbeat"])
async def test_a_stop_ends_the_loops_beside_the_worker_whose_cancellation_was_lost(
    redis_server: RedisServer, redis_client: Redis, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """In Python 3.11 a cancellation that lands as a Redis command's own read timeout fires comes out of the
    command as its ordinary return (redis-py returns None for a timed-out blocking read): the loop that
    sent it goes on. A stopping worker must still end every loop it started."""
    settings = make_settings(redis_server, llm_visibility_timeout_seconds=0.3)
    worker = Worker(settings, ScriptedEngine(), redis_client, name="w1")
    real = getattr(worker.queue, loop)

    async def losing_its_cancellation(*args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, as the race does
            await asyncio.sleep(0.05)
        return await real(*args, **kwargs)

    monkeypatch.setattr(worker.queue, loop, losing_its_cancellation)
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(1.0)  # every loop has gone round
    worker.request_stop()
    await asyncio.wait_for(task, 5.0)
