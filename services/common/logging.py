"""Structured logs: an event name plus fields, and a request id bound per request."""

from __future__ import annotations

import logging
import secrets
import sys

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.tracing import trace_ids

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_NAME = REQUEST_ID_HEADER.encode()


def configure_logging(level: str = "info", json: bool = True, service: str = "") -> None:
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        trace_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    if service:
        structlog.contextvars.bind_contextvars(service=service)


def new_request_id() -> str:
    """128 random bits in hex (32 characters, the length of a UUID's hex)."""
    return secrets.token_hex(16)


class RequestIdMiddleware:
    """Takes the caller's ``X-Request-ID`` (or makes one), binds it to the logs, echoes it back.

    Every request of every service passes here, so it is kept to what it needs: the id bound with
    ``bind_contextvars`` and its tokens reset after (``bound_contextvars`` copies the whole context to
    save what it replaces, each request), no UUID object, no dict of the headers. Under many concurrent callers
    that per-request work is time a model spends waiting for its next batch."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((value for name, value in scope["headers"] if name == _REQUEST_ID_NAME), None)
        request_id = incoming.decode("latin-1")[:128] if incoming else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        echoed = (_REQUEST_ID_NAME, request_id.encode("latin-1"))

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append(echoed)
            await send(message)

        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
