"""The gateway: the public API. Retrieves context, queues one LLM job per question, waits for it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from services.common.app import OK, Checks, StatusResponse, add_common_routes, check, check_all
from services.common.deps import lifespan_state
from services.common.embedding import EmbeddingClient
from services.common.errors import Busy, QueueFull, UpstreamUnavailable
from services.common.http import ServiceClient
from services.common.queue import JobQueue, make_redis
from services.gateway import chat, documents
from services.gateway.chat import ERROR_SHAPES
from services.gateway.config import Settings
from services.gateway.deps import Guarded, State, StateDep
from services.gateway.files import FileParser, ParseLimits
from services.gateway.head import HeadMiddleware
from services.gateway.routes import router
from services.gateway.schemas import error_responses
from services.gateway.security import BodyLimitMiddleware, ConcurrencyLimitMiddleware, Guard
from services.gateway.surrogates import UnicodeMiddleware

CHAIN_BELOW_RETRIEVER = ("qdrant",)
STATUS_MARGIN_SECONDS = 2.0
"""How much longer the status check of the retriever may take than its own checks of its dependencies."""
UPLOADS = frozenset({("POST", "/v1/files")})
"""Requests whose bodies are spooled to disk (multipart files over 1 MiB go to /tmp) before a handler runs."""


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def create_app(
    settings: Settings | None = None,
    *,
    retriever_transport: httpx.AsyncBaseTransport | None = None,
    embedding_transport: httpx.AsyncBaseTransport | None = None,
    cpu_embedding_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """Transports let tests put a retriever and the embedding services (or stand-ins) in the same process."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, object]]:
        redis = make_redis(settings)
        state = State(
            settings=settings,
            redis=redis,
            queue=JobQueue(redis, settings),
            retriever=ServiceClient(
                "retriever", settings.retriever_url, settings.upstream_timeout_seconds, transport=retriever_transport
            ),
            embedding=EmbeddingClient.from_settings(
                settings, settings.upstream_timeout_seconds, embedding_transport, cpu_embedding_transport
            ),
            guard=Guard(settings),
            files=file_parser(settings),
        )
        try:
            yield lifespan_state(state)
        finally:
            state.files.close()
            await state.retriever.aclose()
            await state.embedding.aclose()
            await state.guard.aclose()
            await redis.aclose()

    app = FastAPI(
        title="ragpod",
        version="0.1.0",
        description="Ask questions over your own documents; answers come with their sources.",
        lifespan=lifespan,
    )
    # Innermost of the middleware (the common ones wrap it): a body over the limit is refused before
    # anything reads it, and the refusal is still counted and carries the request id; within the limit,
    # a JSON body that holds a lone surrogate is refused naming its field.
    app.add_middleware(UnicodeMiddleware, shapes=ERROR_SHAPES)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, shapes=ERROR_SHAPES)
    app.add_middleware(HeadMiddleware)
    if settings.max_concurrent_uploads:  # each upload may spool up to RAG_MAX_BODY_BYTES to /tmp
        app.add_middleware(
            ConcurrencyLimitMiddleware,
            limit=settings.max_concurrent_uploads,
            shapes=ERROR_SHAPES,
            only=UPLOADS,
            what="uploads",
            setting="RAG_MAX_CONCURRENT_UPLOADS",
        )
    if settings.max_concurrent_requests:  # outside the body limit, inside the request id and the metrics
        app.add_middleware(ConcurrencyLimitMiddleware, limit=settings.max_concurrent_requests, shapes=ERROR_SHAPES)
    add_common_routes(
        app,
        "gateway",
        readiness,
        status=status,
        status_dependencies=[Guarded],
        status_responses=error_responses(401, 413, 429, 503),
        error_shapes=ERROR_SHAPES,
    )
    app.include_router(router)
    app.include_router(documents.router)
    app.include_router(chat.router)
    documents.describe_limits(app, settings)
    return app


def file_parser(settings: Settings) -> FileParser:
    limits = ParseLimits(
        max_unpacked_bytes=settings.file_max_unpacked_bytes,
        max_paragraphs=settings.file_max_paragraphs,
        max_pages=settings.file_max_pages,
        max_content_bytes=settings.file_max_content_bytes,
    )
    return FileParser(
        limits,
        workers=settings.file_parse_workers,
        timeout=settings.file_parse_timeout_seconds,
        memory_mb=settings.file_parse_memory_mb,
    )


async def readiness(state: StateDep) -> Checks:
    """Only what this pod needs to serve: its start finished (the state exists). Redis and the
    retriever are dependencies: when one is down, each request that needs it is a 503 naming it."""
    return {"gateway": OK}


async def status(state: StateDep) -> Checks:
    """The whole chain, for people and ``make run``: Redis, the LLM queue, the LLM workers, the embedding
    service (called here for attribution; one of the GPU and CPU services ready is enough), the retriever
    and its Qdrant. Workers are counted from their heartbeats
    (``JobQueue.live_workers``), not from ``XINFO CONSUMERS``: Redis 7.0 does not tell an idle worker from a
    gone one (a read that finds nothing does not refresh the consumer's idle time)."""
    settings = state.settings

    notes: Checks = {}

    async def redis() -> None:
        memory = await state.redis.info("memory")
        used, limit = int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
        policy = str(memory.get("maxmemory_policy", ""))
        if not limit:
            notes["redis"] = f"{OK} (memory {_mib(used)}, no maxmemory)"
            return
        if used >= limit and policy == "noeviction":
            raise Busy(f"out of memory: {_mib(used)} used of maxmemory {_mib(limit)} ({policy}): it refuses new jobs")
        notes["redis"] = f"{OK} (memory {_mib(used)} of {_mib(limit)}, {round(100 * used / limit)}%, {policy})"

    async def queue() -> None:
        depth = await state.queue.depth()
        if depth >= settings.max_queue_depth:
            raise QueueFull(f"full: {depth} jobs waiting (limit {settings.max_queue_depth})")

    workers: Checks = {}

    async def llm_workers() -> None:
        live = await state.queue.live_workers()
        if live == 0:
            raise UpstreamUnavailable("no live LLM worker")
        workers["llm_workers"] = f"{OK} ({live} live)"

    retriever: Checks = {}

    async def below() -> None:
        report = await state.retriever.get("/v1/status", model=StatusResponse)
        retriever.update({name: report.checks.get(name, "not reported") for name in CHAIN_BELOW_RETRIEVER})
        if report.checks.get("retriever", OK) != OK:
            raise UpstreamUnavailable(report.checks["retriever"])

    async def embedding() -> None:
        answer = await state.embedding.ready()
        if answer != OK:
            raise UpstreamUnavailable(answer)

    # The retriever's report runs its own checks, each bounded like these: its bound is longer by a margin,
    # so that a part both depend on (the embedding service) that stalls is named here, not the retriever.
    within = min(5.0, settings.upstream_timeout_seconds)
    own, below_retriever = await asyncio.gather(
        check_all(
            {"redis": redis, "llm_queue": queue, "llm_workers": llm_workers, "embedding": embedding}, within=within
        ),
        check(below, within=within + STATUS_MARGIN_SECONDS),
    )
    checks = {**own, "retriever": below_retriever}
    for name in CHAIN_BELOW_RETRIEVER:
        checks[name] = retriever.get(name, f"unknown: {checks['retriever']}")
    if checks["llm_workers"] == OK:
        checks["llm_workers"] = workers["llm_workers"]
    if checks["redis"] == OK:
        checks["redis"] = notes["redis"]
    return {"gateway": OK, **checks}
