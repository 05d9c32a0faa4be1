"""A caller that goes away cancels its job: the gateway marks it abandoned in Redis, and the worker does not
start it, or stops generating it within a token step. Real HTTP (uvicorn), real Redis, a worker in process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from redis.asyncio import Redis

from services.gateway.app import create_app
from services.gateway.config import Settings
from services.llm.config import Settings as LlmSettings
from services.llm.engine import Generation, GenerationRequest, TokenCallback
from services.llm.worker import Worker
from tests.fixtures.embedding import EmbeddingDouble
from tests.fixtures.llm import make_job, metric, wait_for, worker_settings
from tests.fixtures.redis import RedisServer
from tests.fixtures.uvicorn_server import serving
from tests.gateway.conftest import RetrieverDouble

STEP = 0.1  # seconds per token
TOKENS = 200  # a whole answer: 20 s


class Ticker:
    """An engine that makes one token every ``STEP`` seconds up to ``TOKENS``, counting those it made."""

    model_name = "ticker"
    device = "cpu"

    def __init__(self) -> None:
        self.made = 0
        self.calls = 0
        self.stopped_at: float | None = None

    async def start(self) -> None:
        pass

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass

    async def generate(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> Generation:
        self.calls += 1
        try:
            for _ in range(TOKENS):
                await asyncio.sleep(STEP)
                self.made += 1
                if on_token is not None:
                    await on_token(" tick")
        except asyncio.CancelledError:
            self.stopped_at = time.monotonic()
            raise
        return Generation(text="tick" * TOKENS, completion_tokens=TOKENS, prompt_tokens=1, finish_reason="length")


@dataclass
class Served:
    url: str
    engine: Ticker
    redis: Redis
    settings: LlmSettings


@pytest.fixture
async def served(redis_server: RedisServer, redis_client: Redis) -> AsyncIterator[Served]:
    settings = Settings(redis_url=redis_server.url)
    app = create_app(
        settings,
        retriever_transport=httpx.MockTransport(RetrieverDouble()),
        embedding_transport=EmbeddingDouble().transport(),
    )
    engine = Ticker()
    llm_settings = LlmSettings(redis_url=redis_server.url, llm_read_block_ms=100)
    worker_redis = Redis.from_url(redis_server.url, decode_responses=True)
    worker = Worker(llm_settings, engine, worker_redis, name="cancel-worker")
    task = asyncio.create_task(worker.run())
    try:
        async with serving(app) as url:
            yield Served(url, engine, redis_client, llm_settings)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
        await worker_redis.aclose()


async def stopped(served: Served, before: float) -> None:
    async def abandoned() -> bool:
        return metric("rag_llm_jobs_abandoned_total") > before

    await wait_for(abandoned, within=15)
    assert served.engine.stopped_at is not None  # its generation was cancelled, not left to run out


async def test_a_stream_dropped_after_two_tokens_stops_its_generation_within_a_token_step(served: Served) -> None:
    before = metric("rag_llm_jobs_abandoned_total")
    tokens_before = metric("rag_llm_tokens_generated_total")
    seen = 0
    question = {"question": "When was the Zorblax first sold?", "top_k": 1, "stream": True}
    async with (
        httpx.AsyncClient(base_url=served.url, timeout=30) as client,
        client.stream("POST", "/v1/ask", json=question) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line == "event: token":
                seen += 1
                if seen == 2:
                    break  # the client goes away
    gone_at = time.monotonic()
    await stopped(served, before)
    assert served.engine.stopped_at is not None and served.engine.stopped_at - gone_at < 5
    made = served.engine.made
    assert 2 <= made <= 2 + 5, made  # what was read, what was on its way, and one step: not 200
    await asyncio.sleep(3 * STEP)
    assert served.engine.made == made  # nothing made after it stopped
    assert metric("rag_llm_tokens_generated_total") - tokens_before == made  # the tokens made are counted
    # The job left the queue, answered with nothing: no done or error, only the tokens made before the stop.
    stream = served.settings.llm_stream
    assert await served.redis.xlen(stream) == 0
    for key in await served.redis.keys(f"{stream}:events:*"):  # the rest expires with the result TTL
        assert {fields["type"] for _, fields in await served.redis.xrange(key)} <= {"token"}


async def test_a_plain_ask_whose_client_disconnects_stops_its_generation(served: Served) -> None:
    before = metric("rag_llm_jobs_abandoned_total")
    question = {"question": "When was the Zorblax first sold?", "top_k": 1}
    async with httpx.AsyncClient(base_url=served.url, timeout=httpx.Timeout(30, read=1.0)) as client:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after a second and closes its connection
            await client.post("/v1/ask", json=question)
    gone_at = time.monotonic()
    await stopped(served, before)
    assert served.engine.stopped_at is not None and served.engine.stopped_at - gone_at < 5
    assert served.engine.made < 1.0 / STEP + 50  # stopped soon after it went away, not after 200 tokens
    assert await served.redis.xlen(served.settings.llm_stream) == 0


async def test_a_job_abandoned_before_a_worker_starts_it_is_not_generated(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    settings = worker_settings(redis_server, "abandoned-early")
    engine = Ticker()
    worker = Worker(settings, engine, redis_client, name="late-worker")
    job = make_job()
    await worker.queue.enqueue(job)
    assert await worker.queue.abandon(job.id)
    assert not await worker.queue.abandon(job.id)  # once
    before = metric("rag_llm_jobs_abandoned_total")
    task = asyncio.create_task(worker.run())
    try:

        async def counted() -> bool:
            return metric("rag_llm_jobs_abandoned_total") > before

        await wait_for(counted)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 10)
    assert engine.calls == 0
    assert await redis_client.xlen(settings.llm_stream) == 0
    assert not await redis_client.xrange(worker.queue.events_key(job.id))  # answered with nothing
