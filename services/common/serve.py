"""Runs an app factory under uvicorn: the body of every ``python -m services.<name>``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI

from services.common import stopping
from services.common.logging import configure_logging
from services.common.memory import freeze_heap
from services.common.settings import ServiceSettings

log = structlog.get_logger(__name__)


def run(
    service: str, settings: ServiceSettings, factory: Callable[[], FastAPI], *, freeze_when_started: bool = True
) -> None:
    """Serve the app ``factory`` makes. ``freeze_when_started``: this process's one heap freeze
    (``services.common.memory.freeze_heap``) comes once the app's startup is done, which is when an app that
    loads its model in its startup has it loaded; False for an app that freezes its heap itself, later."""
    configure_logging(settings.log_level, settings.log_json, service)
    app = factory()
    if freeze_when_started:
        app.router.lifespan_context = frozen_once_started(app.router.lifespan_context)
    stopping.enable()  # a stop signal while the model loads ends the process at once
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    )


Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[Any]]


def frozen_once_started(lifespan: Lifespan) -> Lifespan:
    """``lifespan`` with the heap frozen once the app has started (``services.common.memory.freeze_heap``):
    what the process loaded to start with no longer costs every full collection. Only the process's entry
    point does this, not the app factory, so that tests, which make many apps in one process, do not."""

    @contextlib.asynccontextmanager
    async def started(app: Any) -> AsyncIterator[Any]:
        async with lifespan(app) as state:
            log.info("heap_frozen", objects=freeze_heap())
            yield state

    return started
