"""The path of one question: retrieve, keep the sources above the relevance floor, enqueue one job, wait
for its events, attribute the answer's sentences to the sources.

The sources' sentences are embedded for attribution as soon as the job is
queued, while it waits and is generated; once the answer is there only its own
sentences are left to embed.

A question none of whose sources reaches ``RAG_MIN_RELEVANCE`` is answered at
once as not covered by the documents: no job, no generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from services.common.errors import (
    DeadlineExceeded,
    GenerationFailed,
    QueueFull,
    RagError,
    UpstreamUnavailable,
)
from services.common.http import ServiceClient
from services.common.queue import Event, Job, JobQueue
from services.common.schemas import SearchResponse, Source
from services.gateway.attribution import Embed, SourceSentences, attribute_to, embed_sources
from services.gateway.config import Settings
from services.gateway.metrics import ASK_STAGE_SECONDS, REJECTED, UNANSWERED, UNGROUNDED
from services.gateway.prompt import build_messages, context_texts
from services.gateway.schemas import AskRequest, AskResponse, Timings

log = structlog.get_logger(__name__)

NOT_COVERED = "The indexed documents do not cover this question."


def above_floor(sources: list[Source], min_relevance: float) -> list[Source]:
    """The sources whose score (dense cosine similarity to the question) reaches the relevance floor."""
    return [source for source in sources if source.score >= min_relevance]


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
    """A question retrieved and, unless no source passed the floor, enqueued: what the waiting side needs."""

    job: Job | None  # None: not covered by the documents, nothing was queued
    sources: list[Source]  # those above the floor, numbered [1].. in the prompt
    search: SearchResponse
    started: float  # perf_counter at arrival
    sources_embedded: asyncio.Task[SourceSentences] | None = None  # see embed_sources_early

    def forget(self) -> None:
        """Stops embedding the sources when no answer will need them."""
        if self.sources_embedded is not None:
            self.sources_embedded.cancel()


class _Vectors(BaseModel):
    vectors: list[list[float]]


def retriever_embed(retriever: ServiceClient, request_id: str) -> Embed:
    """Texts to vectors through the retriever's ``/v1/embed`` (the gateway does not call the embedding service
    itself)."""

    async def embed(texts: list[str]) -> list[list[float]]:
        body = await retriever.post("/v1/embed", {"texts": texts}, request_id=request_id)
        try:
            vectors = _Vectors.model_validate(body).vectors
        except ValidationError as exc:
            raise UpstreamUnavailable("retriever answered /v1/embed without vectors") from exc
        if len(vectors) != len(texts):
            raise UpstreamUnavailable(f"retriever returned {len(vectors)} vectors for {len(texts)} texts")
        return vectors

    return embed


def embed_sources_early(
    sources: list[Source], settings: Settings, retriever: ServiceClient, request_id: str
) -> asyncio.Task[SourceSentences]:
    """Starts embedding the sources' sentences for attribution, to run while the job waits and is generated.

    Only a head start: a failure is kept in the task, and the answer (``answered``) embeds them again then.
    """
    texts = context_texts(sources, settings.max_context_chars)
    task = asyncio.create_task(embed_sources(texts, retriever_embed(retriever, request_id)))
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    return task


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
    search = await retriever.post("/v1/search", payload, request_id=request_id, model=SearchResponse)
    ASK_STAGE_SECONDS.labels("retrieve").observe(time.perf_counter() - started)
    sources = above_floor(search.hits, settings.min_relevance)
    if not sources:
        UNANSWERED.inc()
        best = max((hit.score for hit in search.hits), default=None)
        log.info("ask_not_covered", hits=len(search.hits), best_score=best, min_relevance=settings.min_relevance)
        return Prepared(job=None, sources=[], search=search, started=started)
    messages = build_messages(body.question, sources, settings.max_context_chars, settings.system_prompt)
    remaining = deadline - time.time()  # the caller's budget from now; workers count it on Redis' clock
    job = Job(messages=messages, deadline=deadline, timeout_s=remaining, stream=body.stream, request_id=request_id)
    await admit(queue, job, settings)
    embedding = embed_sources_early(sources, settings, retriever, request_id)
    return Prepared(job=job, sources=sources, search=search, started=started, sources_embedded=embedding)


async def follow(queue: JobQueue, prepared: Prepared) -> AsyncIterator[Event]:
    """The job's events until ``done`` or ``error``; raises DeadlineExceeded at the caller's deadline."""
    job = prepared.job
    if job is None:
        return
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
        prepared.forget()  # no answer needs the sources' vectors any more: attributed already, or none coming
        with contextlib.suppress(RedisError):
            await queue.discard(job.id)


def raise_for_error(event: Event) -> None:
    if event.type == "error":
        raise GenerationFailed(str(event.data.get("detail") or "generation failed"))


def timings(prepared: Prepared, done: Event | None) -> Timings:
    total = (time.perf_counter() - prepared.started) * 1000
    ASK_STAGE_SECONDS.labels("total").observe(total / 1000)
    data = done.data if done is not None else {}
    return Timings(
        embed_ms=round(prepared.search.embed_ms, 2),
        search_ms=round(prepared.search.search_ms, 2),
        queue_ms=round(float(data.get("queue_ms", 0.0)), 2),
        generate_ms=round(float(data.get("generate_ms", 0.0)), 2),
        total_ms=round(total, 2),
    )


def not_covered(prepared: Prepared) -> AskResponse:
    """The answer to a question no source passed the floor for: nothing was generated."""
    return AskResponse(answer=NOT_COVERED, sources=[], grounded=False, timings=timings(prepared, None))


async def _embedded_early(prepared: Prepared) -> SourceSentences | None:
    """The sources' sentences as embedded while the answer was generated; None if that was not done or failed
    (the embedding service busy or down then: the answer tries again)."""
    if prepared.sources_embedded is None:
        return None
    try:
        return await prepared.sources_embedded
    except (RagError, ValueError) as exc:
        log.info("attribution_head_start_failed", error=str(exc)[:200])
        return None


async def answered(
    prepared: Prepared, done: Event, settings: Settings, retriever: ServiceClient, request_id: str
) -> AskResponse:
    """The full answer to a ``done`` event: each sentence attributed to the sources, whose sentences were
    embedded while it was generated; the answer's own sentences take one more call through the retriever.

    The plain and the streamed answer are both built here, so they carry the same citations.
    """
    answer = str(done.data.get("answer", ""))
    started = time.perf_counter()
    embed = retriever_embed(retriever, request_id)
    sources = await _embedded_early(prepared)
    if sources is None:
        sources = await embed_sources(context_texts(prepared.sources, settings.max_context_chars), embed)
    attribution = await attribute_to(answer, sources, embed, settings.min_support)
    ASK_STAGE_SECONDS.labels("attribute").observe(time.perf_counter() - started)
    if not attribution.grounded:
        UNGROUNDED.inc()
    log.info(
        "answer_attributed",
        sentences=len(attribution.citations),
        grounded=attribution.grounded,
        warnings=len(attribution.warnings),
        attribute_ms=round((time.perf_counter() - started) * 1000, 2),
    )
    return AskResponse(
        answer=answer,
        sources=prepared.sources,
        citations=attribution.citations,
        grounded=attribution.grounded,
        citation_warnings=attribution.warnings,
        timings=timings(prepared, done),
        model=str(done.data.get("model", "")),
    )
