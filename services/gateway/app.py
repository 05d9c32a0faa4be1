"""The gateway: the public API. Retrieves context, queues one LLM job per question, waits for it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from services.common.app import OK, Checks, StatusResponse, add_common_routes, check_all
from services.common.deps import lifespan_state
from services.common.embedding import EmbeddingClient
from services.common.errors import QueueFull, UpstreamUnavailable
from services.common.http import ServiceClient
from services.common.queue import JobQueue, make_redis
from services.gateway import chat, documents
from services.gateway.chat import ERROR_SHAPES
from services.gateway.config import Settings
from services.gateway.deps import Guarded, State, StateDep
from services.gateway.routes import router
from services.gateway.schemas import error_responses
from services.gateway.security import BodyLimitMiddleware, ConcurrencyLimitMiddleware, Guard

CHAIN_BELOW_RETRIEVER = ("qdrant",)


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
        )
        try:
            yield lifespan_state(state)
        finally:
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
    # anything reads it, and the refusal is still counted and carries the request id.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, shapes=ERROR_SHAPES)
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

    async def redis() -> None:
        await state.redis.ping()

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

    checks = await check_all(
        {
            "redis": redis,
            "llm_queue": queue,
            "llm_workers": llm_workers,
            "embedding": embedding,
            "retriever": below,
        },
        within=min(5.0, settings.upstream_timeout_seconds),
    )
    for name in CHAIN_BELOW_RETRIEVER:
        checks[name] = retriever.get(name, f"unknown: {checks['retriever']}")
    if checks["llm_workers"] == OK:
        checks["llm_workers"] = workers["llm_workers"]
    return {"gateway": OK, **checks}
