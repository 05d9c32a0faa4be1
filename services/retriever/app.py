"""The retriever: chunks and indexes documents, answers hybrid searches over Qdrant."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import structlog
from fastapi import FastAPI

from services.common.app import OK, Checks, add_common_routes, check_all
from services.common.deps import lifespan_state
from services.common.embedding import EmbeddingClient
from services.common.errors import RagError, UpstreamUnavailable
from services.retriever.config import Settings
from services.retriever.deps import State, StateDep
from services.retriever.indexing import DimensionCheck
from services.retriever.routes import router
from services.retriever.store import VectorStore, open_store
from services.retriever.text import KeywordEncoder

log = structlog.get_logger(__name__)


def create_app(
    settings: Settings | None = None,
    embedding_transport: httpx.AsyncBaseTransport | None = None,
    *,
    cpu_embedding_transport: httpx.AsyncBaseTransport | None = None,
    store: VectorStore | None = None,
) -> FastAPI:
    """Transports let tests put the embedding services in the same process; ``store`` a backend of their own."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, object]]:
        opened = store if store is not None else await open_store(settings)
        state = State(
            settings=settings,
            store=opened,
            embedding=EmbeddingClient.from_settings(
                settings, settings.upstream_timeout_seconds, embedding_transport, cpu_embedding_transport
            ),
            encoder=KeywordEncoder(settings.chunk_size),
            dimensions=DimensionCheck(opened),
        )
        probe = asyncio.create_task(_compare_dimensions(state))
        try:
            yield lifespan_state(state)
        finally:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
            await state.embedding.aclose()
            if store is None:  # a store handed in belongs to the caller
                await opened.close()

    app = FastAPI(title="ragpod retriever", version="0.1.0", lifespan=lifespan)
    add_common_routes(app, "retriever", readiness, status=status)
    app.include_router(router)
    return app


async def _compare_dimensions(state: State) -> None:
    """At start, when the embedding service already answers: a store made for another model is found at once."""
    try:
        embedded = await state.embedding.embed(["dimension check"])
        state.dimensions.compare(embedded.dimension)
    except RagError as exc:
        if state.dimensions.error is None:
            log.info("dimension_check_deferred", reason=exc.detail)


async def readiness(state: StateDep) -> Checks:
    """Only what this pod needs: its store opened (the state exists). Qdrant and the embedding
    service are dependencies: when one is down, each request that needs it is a 503 naming it."""
    return {"retriever": OK}


async def status(state: StateDep) -> Checks:
    """This service, its Qdrant and its embedding service, for people and ``make run``."""

    async def retriever() -> None:
        state.dimensions.raise_if_failed()

    async def embedding() -> None:
        answer = await state.embedding.ready()
        if answer != OK:
            raise UpstreamUnavailable(answer)

    return await check_all(
        {"retriever": retriever, "qdrant": state.store.ping, "embedding": embedding},
        within=min(5.0, state.settings.upstream_timeout_seconds),
    )
