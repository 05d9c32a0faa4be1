"""The gateway's side of the queue, in process on a real Redis: backpressure, outages, deadlines, errors, streaming.

The retriever is a stand-in (httpx.MockTransport; it has its own tests) and the
worker runs in process with the scripted engine. test_processes.py does the
same things again with every service as a real process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from ragpod.processes import free_port
from ragpod.redis_server import start_redis
from services.common.queue import Job, JobQueue
from services.gateway.app import create_app
from services.gateway.config import Settings
from services.llm.config import Settings as LlmSettings
from services.llm.worker import Worker
from tests.fixtures.apps import in_process
from tests.fixtures.embedding import EmbeddingDouble
from tests.fixtures.engines import ScriptedEngine
from tests.fixtures.llm import parse_sse, queue_is_empty, wait_for
from tests.fixtures.redis import RedisServer

STREAM = "t:gateway"
QUEUE = {"llm_stream": STREAM, "llm_group": f"{STREAM}:workers", "llm_dead_letter_stream": f"{STREAM}:dead"}
WORKER = {**QUEUE, "llm_read_block_ms": 100}
HIT = {"document_id": "zorblax.md", "chunk": 0, "score": 0.9, "text": "The Zorblax was sold in 1987.", "metadata": {}}
ASK = {"question": "When was the Zorblax sold?", "top_k": 1}


class Retriever:
    """Answers one hit; with ``hold_for`` set, holds every search until that many have arrived."""

    def __init__(self) -> None:
        self.searches = 0
        self.hold_for = 0
        self.delay = 0.0  # seconds each search takes
        self._all_arrived = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.searches += 1
        await asyncio.sleep(self.delay)
        if self.hold_for:
            if self.searches >= self.hold_for:
                self._all_arrived.set()
            await asyncio.wait_for(self._all_arrived.wait(), 20)
        return httpx.Response(200, json={"hits": [HIT], "embed_ms": 1.0, "search_ms": 1.0})


def embed(texts: list[str]) -> list[list[float]]:
    """Stand-in vectors: one per text, the same for the same text."""
    return [[1.0, float(len(text) % 7), float(sum(map(ord, text)) % 11)] for text in texts]


@asynccontextmanager
async def gateway(
    redis_url: str, engine: ScriptedEngine | None = None, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Retriever]]:
    """The gateway app with its lifespan, a stand-in retriever and, given an engine, a worker."""
    # No floors on the answer's check: the stand-in vectors support nothing, and these tests follow the scripted
    # engine's own text through the queue (the check has tests of its own).
    settings = Settings(redis_url=redis_url, **{**QUEUE, "min_support": 0.0, "min_question_support": 0.0, **overrides})
    retriever = Retriever()
    app = create_app(  # the gateway's attribution: any fixed vectors do here
        settings,
        retriever_transport=httpx.MockTransport(retriever),
        embedding_transport=EmbeddingDouble(embed).transport(),
    )
    worker, task, worker_redis = None, None, None
    if engine is not None:
        worker_redis = Redis.from_url(redis_url, decode_responses=True)
        worker = Worker(LlmSettings(redis_url=redis_url, **WORKER), engine, worker_redis, name="in-process")
        task = asyncio.create_task(worker.run())
    try:
        async with in_process(app, base_url="http://gateway") as client:
            yield client, retriever
    finally:
        if worker is not None and task is not None and worker_redis is not None:
            worker.request_stop()
            await asyncio.wait_for(task, 10)
            await worker_redis.aclose()


async def test_full_queue_is_503_with_retry_after_before_any_work(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    queue = JobQueue(redis_client, Settings(**QUEUE))
    await queue.ensure_group()
    for _ in range(3):  # nobody reads them: the queue is full
        await queue.enqueue(Job(messages=[{"role": "user", "content": "x"}], deadline=time.time() + 60))
    async with gateway(redis_server.url, max_queue_depth=3, retry_after_seconds=7) as (client, retriever):
        response = await client.post("/v1/ask", json=ASK)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "7"
        assert response.json()["error"] == "queue_full"
        assert "3 jobs" in response.json()["detail"]
        # Turned away before retrieval and before enqueueing.
        assert retriever.searches == 0
        assert await redis_client.xlen(STREAM) == 3
        streamed = await client.post("/v1/ask", json={**ASK, "stream": True})
        assert streamed.status_code == 503 and streamed.headers["retry-after"] == "7"


async def test_a_burst_of_callers_never_admits_more_than_the_limit(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    """50 callers at once against a limit of 8, nobody reading: all pass the early check together (the
    queue is empty then), all retrieve, and only 8 jobs may enter the queue."""
    async with gateway(redis_server.url, max_queue_depth=8, ask_timeout_seconds=3) as (client, retriever):
        retriever.hold_for = 50
        responses = await asyncio.gather(*(client.post("/v1/ask", json=ASK) for _ in range(50)))
    statuses = sorted(response.status_code for response in responses)
    assert await redis_client.xlen(STREAM) == 8
    assert statuses == [503] * 42 + [504] * 8  # 8 admitted (nobody answers them), 42 refused
    refused = [r for r in responses if r.status_code == 503]
    assert all(r.json()["error"] == "queue_full" and r.headers["retry-after"] for r in refused)


async def test_queue_below_the_limit_is_served(redis_server: RedisServer, redis_client: Redis) -> None:
    queue = JobQueue(redis_client, Settings(**QUEUE))
    await queue.ensure_group()
    await queue.enqueue(Job(messages=[{"role": "user", "content": "x"}], deadline=time.time() - 1))  # expired
    async with gateway(redis_server.url, ScriptedEngine(), max_queue_depth=2) as (client, _):
        response = await client.post("/v1/ask", json=ASK)
        assert response.status_code == 200, response.text


async def test_redis_down_is_a_quick_503_that_says_so() -> None:
    nothing_there = f"redis://127.0.0.1:{free_port()}/0"
    async with gateway(nothing_there) as (client, retriever):
        for payload in (ASK, {**ASK, "stream": True}):
            response = await client.post("/v1/ask", json=payload)
            assert response.status_code == 503
            assert response.json() == {
                "error": "upstream_unavailable",
                "detail": "the job queue (redis) is unavailable",
            }
        assert retriever.searches == 0
        assert (await client.get("/readyz")).status_code == 200  # readiness never follows a dependency


async def test_no_answer_by_the_deadline_is_504_that_says_so(redis_server: RedisServer, redis_client: Redis) -> None:
    async with gateway(redis_server.url, ask_timeout_seconds=1.0) as (client, retriever):  # no worker answers
        retriever.delay = 0.2  # the deadline counts from arrival, and the detail names it as configured
        response = await client.post("/v1/ask", json=ASK)
        assert response.status_code == 504
        assert response.json()["error"] == "deadline_exceeded"
        assert "deadline of 1 s" in response.json()["detail"]
        streamed = await client.post("/v1/ask", json={**ASK, "stream": True})
        assert parse_sse(streamed.text)[-1] == (
            "error",
            {
                "error": "deadline_exceeded",
                "detail": "no answer within the deadline of 1 s; the job was dropped and will not be generated",
            },
        )
    # The job left behind is past its deadline: a worker drops it without generating.
    engine = ScriptedEngine()
    settings = LlmSettings(**QUEUE)
    await JobQueue(redis_client, settings).ensure_group()
    async with gateway(redis_server.url, engine):
        await wait_for(lambda: queue_is_empty(redis_client, settings.llm_stream, settings.llm_group))
        assert engine.calls == []


async def test_failed_generation_is_an_error_for_the_caller(redis_server: RedisServer, redis_client: Redis) -> None:
    async with gateway(redis_server.url, ScriptedEngine(fail_times=100, retryable=False)) as (client, _):
        response = await client.post("/v1/ask", json=ASK)
        assert response.status_code == 502
        assert response.json() == {"error": "generation_failed", "detail": "scripted failure 1"}
        streamed = await client.post("/v1/ask", json={**ASK, "stream": True})
        assert parse_sse(streamed.text) == [("error", {"error": "generation_failed", "detail": "scripted failure 2"})]
    assert await redis_client.xlen(f"{STREAM}:dead") == 2


async def test_streaming_events_arrive_in_order_and_join_to_the_answer(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    async with gateway(redis_server.url, ScriptedEngine(delay=0.01)) as (client, _):
        response = await client.post("/v1/ask", json={**ASK, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    names = [name for name, _ in events]
    assert names == ["token"] * (len(events) - 1) + ["done"]
    done = events[-1][1]
    assert "".join(data["text"] for _, data in events[:-1]) == done["answer"]
    assert done["answer"] == "answer to: Question: When was the Zorblax sold?"
    assert done["sources"] == [HIT]
    assert set(done["timings"]) == {"embed_ms", "search_ms", "queue_ms", "generate_ms", "total_ms"}


async def test_questions_waiting_while_redis_restarts_are_all_answered_once(tmp_path: Path) -> None:
    """Redis restarts (with its append-only file) while eight callers wait, some streaming: each gets its own
    answer, once, and each job is generated once."""
    port = free_port()
    server = start_redis(port, tmp_path / "redis", persist=True)
    url = f"redis://127.0.0.1:{port}/0"
    engine = ScriptedEngine(delay=0.15)
    questions = [f"Question {letter} about the Zorblax?" for letter in "abcdefgh"]  # no number: none is in the source
    try:
        async with gateway(url, engine) as (client, retriever):
            asking = [
                asyncio.create_task(client.post("/v1/ask", json={"question": q, "top_k": 1, "stream": n % 2 == 1}))
                for n, q in enumerate(questions)
            ]
            await wait_for(lambda: _true(retriever.searches == len(questions) and engine.started.is_set()))
            await asyncio.sleep(0.3)  # every job admitted, the first ones being generated
            server.stop()  # SIGTERM: Redis writes its append-only file and exits; the callers keep waiting
            await asyncio.sleep(1.0)
            server = start_redis(port, tmp_path / "redis", persist=True)
            responses = await asyncio.wait_for(asyncio.gather(*asking), 60)
    finally:
        server.stop()
    answers = []
    for n, response in enumerate(responses):
        assert response.status_code == 200, response.text
        if n % 2:
            events = parse_sse(response.text)
            assert [name for name, _ in events].count("done") == 1 and events[-1][0] == "done", events
            answers.append(events[-1][1]["answer"])
        else:
            answers.append(response.json()["answer"])
    assert answers == [f"answer to: Question: {q}" for q in questions]
    assert sorted(call.messages[-1]["content"].splitlines()[-1] for call in engine.calls) == sorted(
        f"Question: {q}" for q in questions
    )


async def _true(value: bool) -> bool:
    return value


async def test_redis_gone_for_the_whole_wait_is_a_503_naming_it_not_a_deadline(tmp_path: Path) -> None:
    port = free_port()
    server = start_redis(port, tmp_path / "redis", persist=True)
    try:
        async with gateway(f"redis://127.0.0.1:{port}/0", ask_timeout_seconds=2.0) as (client, retriever):
            asking = asyncio.create_task(client.post("/v1/ask", json=ASK))  # no worker: the job waits
            await wait_for(lambda: _true(retriever.searches == 1))
            await asyncio.sleep(0.2)
            server.stop()
            response = await asyncio.wait_for(asking, 10)
    finally:
        server.stop()
    assert response.status_code == 503
    assert response.json() == {"error": "upstream_unavailable", "detail": "the job queue (redis) is unavailable"}


async def test_no_live_worker_is_a_quick_503_with_retry_after_when_workers_are_required(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    """With the LLM tier at zero a question would wait out its whole deadline for a 504 (the test above); with
    RAG_REQUIRE_LLM_WORKERS it is refused at once, before retrieval and before a job is queued, and answered
    as soon as a worker beats."""
    overrides = {"require_llm_workers": True, "no_workers_retry_after_seconds": 90, "ask_timeout_seconds": 30}
    async with gateway(redis_server.url, **overrides) as (client, retriever):
        for payload in (ASK, {**ASK, "stream": True}):
            response = await client.post("/v1/ask", json=payload)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "90"
            assert response.json() == {
                "error": "upstream_unavailable",
                "detail": "no LLM worker is running (the LLM tier is scaled to zero or starting); retry later",
            }
        chat = await client.post(
            "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": ASK["question"]}]}
        )
        assert chat.status_code == 503 and chat.headers["retry-after"] == "90"
        assert "no LLM worker is running" in chat.json()["error"]["message"]
        assert retriever.searches == 0
        assert await redis_client.xlen(STREAM) == 0
        assert 'rag_gateway_rejected_total{reason="no_workers"}' in (await client.get("/metrics")).text

        worker_redis = Redis.from_url(redis_server.url, decode_responses=True)
        worker = Worker(LlmSettings(redis_url=redis_server.url, **WORKER), ScriptedEngine(), worker_redis, name="late")
        task = asyncio.create_task(worker.run())
        try:
            await wait_for(lambda: _live(worker))
            response = await client.post("/v1/ask", json=ASK)
            assert response.status_code == 200, response.text
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, 10)
            await worker_redis.aclose()


async def _live(worker: Worker) -> bool:
    return await worker.queue.live_workers() > 0
