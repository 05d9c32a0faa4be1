"""Every error the gateway answers is in one shape, 404 and 405 included, and no failure below it is a 500."""

from __future__ import annotations

import httpx
import pytest
from redis.asyncio import Redis

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
