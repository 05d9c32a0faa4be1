"""The embedding service: text -> vectors, dynamically micro-batched, GPU when present."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from fastapi import FastAPI

from services.common.app import add_common_routes
from services.common.gpu import sample_forever
from services.common.metrics import MODEL_INFO
from services.embedding.config import Settings
from services.embedding.model import Batcher, Embedder
from services.embedding.routes import router

log = structlog.get_logger(__name__)


def create_app(settings: Settings | None = None, embedder: Embedder | None = None) -> FastAPI:
    settings = settings or Settings()

    async def load(app: FastAPI) -> None:
        try:
            model = (
                embedder
                if embedder is not None
                else await asyncio.to_thread(Embedder, settings.embedding_model, settings.embedding_device)
            )
        except Exception as exc:
            app.state.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("embedding_model_failed", model=settings.embedding_model or "packaged")
            return
        MODEL_INFO.labels("embedding", model.name, model.device).set(1)
        log.info("embedding_model_loaded", model=model.name, device=model.device, dimension=model.dimension)
        batcher = Batcher(model, settings.embedding_max_batch, settings.embedding_max_wait_ms)
        batcher.start()
        app.state.batcher = batcher

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The model loads in the background: /healthz answers at once, /readyz once it is loaded.
        loading = asyncio.create_task(load(app))
        gpu_task = asyncio.create_task(sample_forever())
        try:
            yield
        finally:
            gpu_task.cancel()
            loading.cancel()
            if app.state.batcher is not None:
                await app.state.batcher.stop()
                app.state.batcher = None

    app = FastAPI(title="ragpod embedding", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.batcher = None
    app.state.load_error = ""

    async def readiness(app: FastAPI) -> dict[str, str]:
        if app.state.batcher is not None:
            return {"model": "ok"}
        return {"model": f"failed: {app.state.load_error}" if app.state.load_error else "loading"}

    add_common_routes(app, "embedding", readiness)
    app.include_router(router)
    return app
