"""ServiceClient: get and post fail alike, and every failure is a RagError naming the service."""

from __future__ import annotations

import httpx
import pytest
from pydantic import BaseModel

from services.common.errors import (
    InvalidInput,
    NotFound,
    RagError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from services.common.http import ServiceClient


class Answer(BaseModel):
    value: int


def client_answering(answer: httpx.Response | Exception) -> ServiceClient:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(answer, Exception):
            raise answer
        return answer

    return ServiceClient("store", "http://store", 5, transport=httpx.MockTransport(handler))


NOT_JSON = "something other than the JSON expected"
CASES: list[tuple[httpx.Response | Exception, type[RagError], str]] = [
    (httpx.ConnectError("refused"), UpstreamUnavailable, "store is unavailable"),
    (httpx.ReadTimeout("slow"), UpstreamTimeout, "store did not answer in time"),
    (httpx.Response(503, json={"detail": "loading"}), UpstreamUnavailable, "store is unavailable: loading"),
    (httpx.Response(502, text="bad gateway"), UpstreamUnavailable, "store is unavailable"),
    (httpx.Response(504, json={}), UpstreamTimeout, "store timed out"),
    (httpx.Response(500, json={"detail": "boom"}), UpstreamError, "store failed: boom"),
    (httpx.Response(404, json={"detail": "no document 'a'"}), NotFound, "no document 'a'"),
    (httpx.Response(422, json={"detail": "top_k: too big"}), InvalidInput, "top_k: too big"),
    (httpx.Response(200, text="<html>"), UpstreamError, f"store answered /x with {NOT_JSON}"),
]


@pytest.mark.parametrize(("answer", "error", "detail"), CASES)
@pytest.mark.parametrize("method", ["get", "post"])
async def test_get_and_post_translate_alike(
    method: str, answer: httpx.Response | Exception, error: type[RagError], detail: str
) -> None:
    client = client_answering(answer)
    with pytest.raises(RagError) as raised:
        if method == "get":
            await client.get("/x")
        else:
            await client.post("/x", {"q": 1})
    await client.aclose()
    assert type(raised.value) is error
    assert raised.value.detail == detail


async def test_a_503_passes_its_retry_after_on() -> None:
    client = client_answering(httpx.Response(503, json={"detail": "full"}, headers={"Retry-After": "3"}))
    with pytest.raises(UpstreamUnavailable) as raised:
        await client.post("/x", {})
    await client.aclose()
    assert raised.value.headers == {"Retry-After": "3"}


async def test_answers_are_validated_into_the_model_asked_for() -> None:
    good = client_answering(httpx.Response(200, json={"value": 3}))
    assert await good.get("/x", model=Answer) == Answer(value=3)
    assert await good.post("/x", {}, model=Answer) == Answer(value=3)
    await good.aclose()
    wrong = client_answering(httpx.Response(200, json={"value": "three"}))
    with pytest.raises(UpstreamError, match="store answered /x"):
        await wrong.get("/x", model=Answer)
    await wrong.aclose()


async def test_a_204_is_none() -> None:
    client = client_answering(httpx.Response(204))
    assert await client.request("DELETE", "/x") is None
    await client.aclose()
