"""Runs an app factory under uvicorn: the body of every ``python -m services.<name>``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.common import stopping, tracing
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
    tracing.setup(service)
    app = factory()
    if freeze_when_started:
        app.router.lifespan_context = frozen_once_started(app.router.lifespan_context)
    stopping.enable()  # a stop signal while the model loads ends the process at once
    try:
        uvicorn.run(app, **server_options(settings))
    finally:
        tracing.shutdown()


def server_options(settings: ServiceSettings) -> dict[str, Any]:
    """uvicorn's settings for a service: its address, quiet logs, the graceful stop, and the read deadline."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": "warning",
        "access_log": False,
        "timeout_graceful_shutdown": int(settings.shutdown_grace_seconds),
        "http": with_read_deadline(settings.request_read_timeout_seconds),
    }


def with_read_deadline(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools) with a deadline on what the client sends.

    uvicorn closes a keep-alive connection that stays idle after an answer, but nothing else: a new connection
    that never sends a request, headers sent a byte at a time, or a body shorter than its Content-Length hold a
    connection (and a request's handler, waiting for its body) for ever. Here a connection waiting for a
    request's headers (from the moment it opens, or its last answer ends), or then for its body, is closed when
    they have not arrived within ``seconds``; a handler reading that body sees the client gone."""

    class ReadDeadlineProtocol(HttpToolsProtocol):
        _read_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._wait_for_client()

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._wait_for_client()  # now for the body, until the message is complete

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._client_done()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._wait_for_client()  # the next request's headers

        def connection_lost(self, exc: Exception | None) -> None:
            self._client_done()
            super().connection_lost(exc)

        def _wait_for_client(self) -> None:
            self._client_done()
            self._read_deadline = self.loop.call_later(seconds, self._too_slow)

        def _client_done(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _too_slow(self) -> None:
            self._read_deadline = None
            if not self.transport.is_closing():
                waiting_for = "body" if self.cycle is not None and self.cycle.more_body else "request"
                log.info("connection_read_timeout", waiting_for=waiting_for, seconds=seconds)
                self.transport.close()

    return ReadDeadlineProtocol


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
