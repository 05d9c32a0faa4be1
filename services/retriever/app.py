"""The retriever: chunks and indexes documents, answers vector searches over Qdrant."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from services.common.app import add_common_routes
from services.common.errors import RagError
from services.common.http import ServiceClient
from services.retriever.config import Settings
from services.retriever.routes import router
from services.retriever.store import VectorStore


def create_app(
    settings: Settings | None = None, embedding_transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    """``embedding_transport`` lets tests put the embedding service in the same process."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = await asyncio.to_thread(VectorStore, settings)
        app.state.embedding = ServiceClient(
            "embedding", settings.embedding_url, settings.upstream_timeout_seconds, transport=embedding_transport
        )
        try:
            yield
        finally:
            await app.state.embedding.aclose()
            app.state.store.close()

    app = FastAPI(title="ragpod retriever", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings

    async def readiness(app: FastAPI) -> dict[str, str]:
        checks = {}
        try:
            await app.state.store.ping()
            checks["qdrant"] = "ok"
        except RagError as exc:
            checks["qdrant"] = exc.detail
        try:
            response = await app.state.embedding.get("/readyz")
            checks["embedding"] = "ok" if response.status_code == 200 else f"embedding answered {response.status_code}"
        except RagError as exc:
            checks["embedding"] = exc.detail
        return checks

    add_common_routes(app, "retriever", readiness)
    app.include_router(router)
    return app
