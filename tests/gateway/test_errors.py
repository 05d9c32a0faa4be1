"""Every error the gateway answers is in one shape, 404 and 405 included; a failure below it is never passed on
as a 500, and a bug of its own is a 500 naming the request id."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import structlog
from redis.asyncio import Redis

from services.common.logging import configure_logging
from services.gateway.app import create_app
from services.gateway.config import Settings
from tests.fixtures.apps import in_process
from tests.fixtures.redis import RedisServer
from tests.gateway.conftest import Gateway

ASK = {"question": "When was the Zorblax first sold?", "top_k": 1}


async def test_unknown_route_is_404_in_the_error_shape(gateway: Gateway) -> None:
    response = await gateway.client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "detail": "no such route"}


async def test_wrong_method_is_405_in_the_error_shape(gateway: Gateway) -> None:
    response = await gateway.client.delete("/v1/ask")
    assert response.status_code == 405
    assert response.json() == {"error": "method_not_allowed", "detail": "method not allowed on this route"}
    assert response.headers["allow"] == "POST"


@pytest.mark.parametrize(
    ("answer", "status", "error", "detail"),
    [
        (httpx.Response(500, text="Internal Server Error"), 502, "upstream_error", "retriever answered 500"),
        (httpx.Response(500, json={"detail": "boom"}), 502, "upstream_error", "retriever failed: boom"),
        (httpx.Response(200, text="<html>not json</html>"), 502, "upstream_error", None),
        (httpx.Response(200, json={"unexpected": True}), 502, "upstream_error", None),
        (httpx.Response(503, json={"detail": "embedding is unavailable"}), 503, "upstream_unavailable", None),
        (httpx.Response(504, json={}), 504, "upstream_timeout", "retriever timed out"),
        (httpx.Response(422, json={"detail": "top_k: too large"}), 422, "validation_error", "top_k: too large"),
        (httpx.Response(404, json={"detail": "no document 'x'"}), 404, "not_found", "no document 'x'"),
    ],
)
async def test_what_the_retriever_answers_is_carried_on_never_as_a_500(
    redis_server: RedisServer,
    redis_client: Redis,
    answer: httpx.Response,
    status: int,
    error: str,
    detail: str | None,
) -> None:
    app = create_app(Settings(redis_url=redis_server.url), retriever_transport=httpx.MockTransport(lambda _: answer))
    async with in_process(app) as client:
        response = await client.post("/v1/ask", json=ASK)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert body["detail"] == detail if detail is not None else "retriever" in body["detail"]
    assert await redis_client.xlen("rag:llm:jobs") == 0  # nothing was queued


async def test_retriever_too_slow_is_504_naming_it(redis_server: RedisServer, redis_client: Redis) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    app = create_app(Settings(redis_url=redis_server.url), retriever_transport=httpx.MockTransport(slow))
    async with in_process(app) as client:
        response = await client.post("/v1/ask", json=ASK)
    assert response.status_code == 504
    assert response.json() == {"error": "upstream_timeout", "detail": "retriever did not answer in time"}


def _a_bug(*_: object, **__: object) -> list[dict[str, str]]:
    raise KeyError("a bug in building the prompt")


@pytest.fixture(autouse=True)
def json_logs() -> Iterator[None]:
    """Logs as the services write them: a traceback as one JSON field (structlog's development renderer
    draws every local of every frame, seconds of a loaded machine's time with the event loop held)."""
    before = structlog.get_config()
    configure_logging(json=True)
    try:
        yield
    finally:
        structlog.configure(**before)


async def test_a_bug_is_a_500_internal_error_naming_the_request_id_and_nothing_is_queued(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.gateway.pipeline.build_messages", _a_bug)
    response = await gateway.client.post("/v1/ask", json=ASK, headers={"x-request-id": "bug-42"})
    assert response.status_code == 500
    assert response.json() == {
        "error": "internal_error",
        "detail": "the service failed on this request (request id bug-42); it has been logged",
    }
    assert response.headers["x-request-id"] == "bug-42" and "retry-after" not in response.headers
    assert "KeyError" not in response.text and "a bug" not in response.text
    assert await gateway.redis.xlen("rag:llm:jobs") == 0
    metrics = (await gateway.client.get("/metrics")).text
    assert 'route="/v1/ask",service="gateway",status="500"' in metrics


async def test_a_bug_under_the_openai_routes_is_a_500_in_openais_shape(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.gateway.pipeline.build_messages", _a_bug)
    body = {"model": "ragpod", "messages": [{"role": "user", "content": ASK["question"]}]}
    response = await gateway.client.post("/v1/chat/completions", json=body, headers={"x-request-id": "bug-43"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert "bug-43" in error["message"] and "a bug" not in response.text


async def test_a_bug_in_a_stream_ends_it_with_an_internal_error_event(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.gateway.pipeline.attribute_to", _a_bug)  # fails after the tokens were sent
    response = await gateway.client.post("/v1/ask", json={**ASK, "stream": True}, headers={"x-request-id": "bug-44"})
    assert response.status_code == 200  # the status line went out with the first token
    events = [block for block in response.text.split("\n\n") if block]
    assert events[0].startswith("event: token")
    assert events[-1].startswith("event: error") and '"error":"internal_error"' in events[-1]
    assert "bug-44" in events[-1] and "a bug" not in response.text
