"""The gateway: the public API. Retrieves context, queues one LLM job per question, waits for it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from services.common.app import add_common_routes
from services.common.errors import RagError
from services.common.http import ServiceClient
from services.common.queue import JobQueue, make_redis
from services.gateway.config import Settings
from services.gateway.routes import router
from services.gateway.security import Guard


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = make_redis(settings)
        app.state.redis = redis
        app.state.queue = JobQueue(redis, settings)
        app.state.retriever = ServiceClient("retriever", settings.retriever_url, settings.upstream_timeout_seconds)
        try:
            yield
        finally:
            await app.state.retriever.aclose()
            await redis.aclose()

    app = FastAPI(
        title="ragpod",
        version="0.1.0",
        description="Ask questions over your own documents; answers come with their sources.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.guard = Guard(settings)

    async def readiness(app: FastAPI) -> dict[str, str]:
        checks = {}
        try:
            await app.state.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"redis unavailable: {type(exc).__name__}"
        try:
            response = await app.state.retriever.get("/healthz")
            checks["retriever"] = "ok" if response.status_code == 200 else f"retriever answered {response.status_code}"
        except RagError as exc:
            checks["retriever"] = exc.detail
        return checks

    add_common_routes(app, "gateway", readiness)
    app.include_router(router)
    return app
