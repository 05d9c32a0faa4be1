"""The path of one question: retrieve, enqueue one job, wait for its events."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import RedisError

from services.common.errors import (
    DeadlineExceeded,
    GenerationFailed,
    QueueFull,
    UpstreamUnavailable,
)
from services.common.http import ServiceClient
from services.common.queue import Event, Job, JobQueue
from services.common.schemas import SearchResponse, Source
from services.gateway.config import Settings
from services.gateway.metrics import ASK_STAGE_SECONDS, REJECTED
from services.gateway.prompt import build_messages
from services.gateway.schemas import AskRequest, Timings

log = structlog.get_logger(__name__)


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    try:
        yield
    except RedisError as exc:
        log.warning("redis_unavailable", error=str(exc)[:200])
        raise UpstreamUnavailable("the job queue (redis) is unavailable") from exc


def queue_full(depth: int, settings: Settings) -> QueueFull:
    REJECTED.labels("queue_full").inc()
    return QueueFull(
        f"the LLM queue is full ({depth} jobs waiting); retry later",
        headers={"Retry-After": str(settings.retry_after_seconds)},
    )


async def admit(queue: JobQueue, job: Job, settings: Settings) -> None:
    """Enqueues the job unless RAG_MAX_QUEUE_DEPTH jobs wait, checked and added in one step in Redis,
    so the bound holds across any number of gateway replicas (the early depth check only saves work)."""
    with redis_errors():
        admission = await queue.enqueue(job, max_depth=settings.max_queue_depth)
    if not admission.admitted:
        raise queue_full(admission.depth, settings)


@dataclass
class Prepared:
    """A question retrieved and enqueued: what the waiting side needs."""

    job: Job
    sources: list[Source]
    search: SearchResponse
    started: float  # perf_counter at arrival


async def prepare(
    body: AskRequest, settings: Settings, retriever: ServiceClient, queue: JobQueue, request_id: str
) -> Prepared:
    started = time.perf_counter()
    deadline = time.time() + settings.ask_timeout_seconds
    # Refuse before doing any work when the queue is already full.
    with redis_errors():
        depth = await queue.depth()
    if depth >= settings.max_queue_depth:
        raise queue_full(depth, settings)
    payload: dict[str, Any] = {"query": body.question, "top_k": body.top_k, "filters": body.filters}
    search = SearchResponse.model_validate(await retriever.post("/v1/search", payload, request_id=request_id))
    ASK_STAGE_SECONDS.labels("retrieve").observe(time.perf_counter() - started)
    messages = build_messages(body.question, search.hits, settings.max_context_chars, settings.system_prompt)
    remaining = deadline - time.time()  # the caller's budget from now; workers count it on Redis' clock
    job = Job(messages=messages, deadline=deadline, timeout_s=remaining, stream=body.stream, request_id=request_id)
    await admit(queue, job, settings)
    return Prepared(job=job, sources=search.hits, search=search, started=started)


async def follow(queue: JobQueue, prepared: Prepared) -> AsyncIterator[Event]:
    """The job's events until ``done`` or ``error``; raises DeadlineExceeded at the caller's deadline."""
    job = prepared.job
    try:
        with redis_errors():
            remaining = job.deadline - time.time()
            if remaining <= 0:
                raise DeadlineExceeded("no answer before the deadline")
            try:
                async with asyncio.timeout(remaining):
                    async for event in queue.events(job.id):
                        yield event
                        if event.type in ("done", "error"):
                            return
            except TimeoutError:
                REJECTED.labels("deadline").inc()
                raise DeadlineExceeded(
                    f"no answer within the deadline of {round(job.deadline - job.enqueued_at, 1):g} s; "
                    "the job was dropped and will not be generated"
                ) from None
    finally:
        with contextlib.suppress(RedisError):
            await queue.discard(job.id)


def raise_for_error(event: Event) -> None:
    if event.type == "error":
        raise GenerationFailed(str(event.data.get("detail") or "generation failed"))


def timings(prepared: Prepared, done: Event) -> Timings:
    total = (time.perf_counter() - prepared.started) * 1000
    ASK_STAGE_SECONDS.labels("total").observe(total / 1000)
    return Timings(
        embed_ms=round(prepared.search.embed_ms, 2),
        search_ms=round(prepared.search.search_ms, 2),
        queue_ms=round(float(done.data.get("queue_ms", 0.0)), 2),
        generate_ms=round(float(done.data.get("generate_ms", 0.0)), 2),
        total_ms=round(total, 2),
    )
