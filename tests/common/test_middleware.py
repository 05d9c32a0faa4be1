"""The two middlewares every request of every service passes: the request id and the HTTP metrics."""

from __future__ import annotations

import re
from typing import Any

import structlog
from prometheus_client import REGISTRY
from starlette.types import Message, Receive, Scope, Send

from services.common.logging import REQUEST_ID_HEADER, RequestIdMiddleware
from services.common.metrics import MetricsMiddleware


def scope(headers: list[tuple[bytes, bytes]] | None = None, path: str = "/things") -> Scope:
    return {"type": "http", "method": "GET", "path": path, "headers": headers or []}


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


class Recorder:
    """An inner app answering ``status``, noting the log context it ran in."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.contexts: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.contexts.append(structlog.contextvars.get_contextvars())
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


async def call(app: Any, request: Scope) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(request, receive, send)
    return sent


def echoed(sent: list[Message]) -> bytes:
    value: bytes = dict(sent[0]["headers"])[REQUEST_ID_HEADER.encode()]
    return value


async def test_a_request_without_an_id_gets_a_new_one_bound_to_its_logs_and_echoed() -> None:
    inner = Recorder()
    app = RequestIdMiddleware(inner)
    first, second = await call(app, scope()), await call(app, scope())
    ids = [echoed(first).decode(), echoed(second).decode()]
    assert all(re.fullmatch(r"[0-9a-f]{32}", found) for found in ids), ids
    assert ids[0] != ids[1]
    assert [context["request_id"] for context in inner.contexts] == ids


async def test_the_callers_id_is_echoed_byte_for_byte_and_the_log_context_is_restored_after() -> None:
    inner = Recorder()
    app = RequestIdMiddleware(inner)
    tokens = structlog.contextvars.bind_contextvars(request_id="outer")
    try:
        sent = await call(app, scope([(b"x-request-id", b"caf\xe9-7")]))
        assert structlog.contextvars.get_contextvars()["request_id"] == "outer"
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
    assert echoed(sent) == b"caf\xe9-7"
    assert inner.contexts[0]["request_id"] == "caf\xe9-7"
    await call(app, scope())
    assert "request_id" not in structlog.contextvars.get_contextvars()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_each_status_of_a_route_is_counted_on_its_own_series() -> None:
    service = "middleware-test"
    ok, missing = MetricsMiddleware(Recorder(200), service), MetricsMiddleware(Recorder(404), service)
    labels = {"service": service, "method": "GET", "route": "unmatched"}
    for app, times in ((ok, 3), (missing, 2), (ok, 1)):
        for _ in range(times):
            await call(app, scope())
    assert sample("rag_http_requests_total", **labels, status="200") == 4
    assert sample("rag_http_requests_total", **labels, status="404") == 2
    assert sample("rag_http_request_duration_seconds_count", **labels) == 6
    await call(ok, scope(path="/healthz"))  # not measured
    assert sample("rag_http_request_duration_seconds_count", **labels) == 6
