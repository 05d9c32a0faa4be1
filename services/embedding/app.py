"""The embedding service: text -> vectors, dynamically micro-batched, GPU when present."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from fastapi import FastAPI

from services.common.app import OK, Checks, add_common_routes
from services.common.deps import lifespan_state
from services.common.devices import choose_device
from services.common.gpu import sample_forever
from services.common.memory import freeze_heap
from services.common.metrics import MODEL_INFO
from services.common.stopping import loading
from services.embedding.config import Settings
from services.embedding.deps import State, StateDep
from services.embedding.model import (
    Batcher,
    Embedder,
    ModelThreads,
    cpu_threads_per_batch,
    load_embedder,
)
from services.embedding.routes import EmbedFastPath, router

log = structlog.get_logger(__name__)


def create_app(
    settings: Settings | None = None, embedder: Embedder | None = None, *, freeze_after_load: bool = False
) -> FastAPI:
    """``freeze_after_load``: the process's entry point freezes its heap once the model is loaded
    (``services.common.memory.freeze_heap``); tests, many apps in one process, leave it off."""
    settings = settings or Settings()

    async def load(state: State) -> None:
        workers = settings.embedding_workers
        threads: ModelThreads | None = None
        try:
            if embedder is not None:  # handed in (tests, benchmarks): torch's threads left as they are
                threads = ModelThreads(workers, None)
                model = embedder
            else:  # loaded here: torch's threads shared out among the batches
                with loading("embedding model"):
                    device = choose_device(settings.embedding_device, "RAG_EMBEDDING_DEVICE")
                    threads = ModelThreads(workers, cpu_threads_per_batch(workers, device))
                    model = await threads.run(load_embedder, settings.embedding_model, device)
        except Exception as exc:
            if threads is not None:
                threads.shutdown()
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("embedding_model_failed", model=settings.embedding_model or "packaged")
            return
        MODEL_INFO.labels("embedding", model.name, model.device).set(1)
        log.info(
            "embedding_model_loaded",
            model=model.name,
            device=model.device,
            dimension=model.dimension,
            workers=workers,
            threads_per_batch=threads.per_batch,
        )
        batcher = Batcher(
            model, settings.embedding_max_batch, settings.embedding_max_wait_ms, settings.embedding_max_pending, threads
        )
        batcher.start()
        state.batcher = batcher
        if freeze_after_load:
            log.info("heap_frozen", objects=freeze_heap())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, object]]:
        # The model loads in the background: /healthz answers at once, /readyz once it is loaded.
        state = State(settings=settings)
        loading = asyncio.create_task(load(state))
        gpu_task = asyncio.create_task(sample_forever())
        try:
            yield lifespan_state(state)
        finally:
            gpu_task.cancel()
            loading.cancel()
            if state.batcher is not None:
                await state.batcher.stop()
                state.batcher = None

    app = FastAPI(title="ragpod embedding", version="0.1.0", lifespan=lifespan)
    app.add_middleware(EmbedFastPath)  # first, so innermost: inside the request-id and metrics middlewares
    add_common_routes(app, "embedding", readiness, liveness=liveness)
    app.include_router(router)
    return app


async def readiness(state: StateDep) -> Checks:
    """Ready once the model has loaded: the one thing this service needs."""
    if state.batcher is not None:
        return {"model": OK}
    return {"model": f"failed: {state.load_error}" if state.load_error else "loading"}


async def liveness(state: StateDep) -> Checks:
    """Alive while loading or loaded; a model that failed to load will not load by waiting: restart."""
    return {"model": f"failed: {state.load_error}"} if state.load_error else {}
