"""ServiceClient: get and post fail alike, every failure is a RagError naming the service, and only an
idempotent request is sent again after its connection failed. The wire tests use real sockets: a port nothing
listens on, and a raw asyncio server that misbehaves on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from ragpod.processes import free_port
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


class Counting:
    """A mock transport's handler that fails the first ``failures`` requests with ``error``, then answers."""

    def __init__(self, error: Exception, failures: int = 1) -> None:
        self.error, self.failures, self.calls = error, failures, 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return httpx.Response(200, json={"value": 1})


DROPPED = httpx.RemoteProtocolError("Server disconnected without sending a response.")
IDEMPOTENT_CALLS: dict[str, Callable[[ServiceClient], Awaitable[object]]] = {
    "GET": lambda c: c.get("/x"),
    "DELETE": lambda c: c.request("DELETE", "/x"),
    "PUT": lambda c: c.request("PUT", "/x", json={}),
    "POST idempotent=True": lambda c: c.post("/x", {}, idempotent=True),
}


@pytest.mark.parametrize("call", IDEMPOTENT_CALLS.values(), ids=IDEMPOTENT_CALLS.keys())
async def test_an_idempotent_request_is_sent_once_more_after_its_connection_failed(
    call: Callable[[ServiceClient], Awaitable[object]],
) -> None:
    handler = Counting(DROPPED)
    client = ServiceClient("store", "http://store", 5, transport=httpx.MockTransport(handler))
    assert await call(client) == {"value": 1}
    await client.aclose()
    assert handler.calls == 2


@pytest.mark.parametrize("error", [DROPPED, httpx.ReadError("reset"), httpx.WriteError("broken pipe")], ids=type)
async def test_a_post_not_said_to_be_idempotent_is_sent_once(error: Exception) -> None:
    handler = Counting(error)
    client = ServiceClient("store", "http://store", 5, transport=httpx.MockTransport(handler))
    with pytest.raises(UpstreamUnavailable, match="store is unavailable"):
        await client.post("/x", {})
    await client.aclose()
    assert handler.calls == 1


async def test_an_idempotent_request_is_sent_twice_at_most() -> None:
    handler = Counting(DROPPED, failures=5)
    client = ServiceClient("store", "http://store", 5, transport=httpx.MockTransport(handler))
    with pytest.raises(UpstreamUnavailable):
        await client.get("/x")
    await client.aclose()
    assert handler.calls == 2


@pytest.mark.parametrize(
    "error", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.ConnectTimeout("slow")], ids=type
)
async def test_a_refused_connection_or_a_timeout_is_not_sent_again_even_when_idempotent(error: Exception) -> None:
    handler = Counting(error)
    client = ServiceClient("store", "http://store", 5, transport=httpx.MockTransport(handler))
    with pytest.raises((UpstreamUnavailable, UpstreamTimeout)):
        await client.post("/x", {}, idempotent=True)
    await client.aclose()
    assert handler.calls == 1


async def test_an_error_status_is_not_sent_again() -> None:
    calls: list[httpx.Request] = []

    def unavailable(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503, json={"detail": "loading"})

    client = ServiceClient("store", "http://store", 5, transport=httpx.MockTransport(unavailable))
    with pytest.raises(UpstreamUnavailable):
        await client.get("/x")
    await client.aclose()
    assert len(calls) == 1


# On the wire: httpx's own transport, as every service uses it.


async def test_a_refused_connection_is_unavailable_not_a_timeout() -> None:
    client = ServiceClient("gone", f"http://127.0.0.1:{free_port()}", 5)
    with pytest.raises(RagError) as raised:
        await client.post("/x", {}, idempotent=True)
    await client.aclose()
    assert type(raised.value) is UpstreamUnavailable
    assert raised.value.status_code == 503 and raised.value.detail == "gone is unavailable"


Handler = Callable[[asyncio.StreamWriter, int], Awaitable[bool]]
"""Answers (or not) the n-th request (1, 2, ...) of a connection; False closes the connection."""


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A server that reads each request's head and body and lets ``handler`` answer; yields its URL and how
    many requests each connection has read so far, one entry per connection."""
    requests: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        slot = len(requests)
        requests.append(0)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                lengths = [int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length")]
                await reader.readexactly(lengths[0] if lengths else 0)
                requests[slot] += 1
                if not await handler(writer, requests[slot]):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", requests
    finally:
        server.close()
        await server.wait_closed()


OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'


async def answers_only_the_first(writer: asyncio.StreamWriter, number: int) -> bool:
    """The second request on a kept-alive connection is read and the connection closed without a word: the
    race between a pooled client reusing a connection and the server closing it as idle."""
    if number == 1:
        writer.write(OK)
        await writer.drain()
        return True
    return False


async def test_a_kept_alive_connection_dropped_unanswered_gets_an_idempotent_request_again() -> None:
    async with raw_server(answers_only_the_first) as (url, requests):
        client = ServiceClient("store", url, 5)
        assert await client.get("/a") == {"ok": True}
        assert await client.post("/b", {}, idempotent=True) == {"ok": True}
        await client.aclose()
    assert requests == [2, 1]  # the first connection read both and answered one; a new one answered the second


async def test_a_kept_alive_connection_dropped_unanswered_fails_a_post_without_sending_it_again() -> None:
    async with raw_server(answers_only_the_first) as (url, requests):
        client = ServiceClient("store", url, 5)
        assert await client.post("/a", {}) == {"ok": True}
        with pytest.raises(UpstreamUnavailable, match="store is unavailable"):
            await client.post("/b", {})
        await client.aclose()
    assert requests == [2]


async def test_a_service_that_does_not_answer_in_time_is_a_timeout() -> None:
    release = asyncio.Event()

    async def never(writer: asyncio.StreamWriter, number: int) -> bool:
        await release.wait()
        return False

    async with raw_server(never) as (url, requests):
        client = ServiceClient("slow", url, 0.2)
        with pytest.raises(RagError) as raised:
            await client.get("/x")
        await client.aclose()
        release.set()
    assert type(raised.value) is UpstreamTimeout
    assert raised.value.status_code == 504 and raised.value.detail == "slow did not answer in time"
    assert requests == [1]  # read, timed out, not sent again


async def test_a_name_lookup_answered_at_the_resolvers_second_ask_still_connects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A resolver asks again 5 s after a DNS query that got no answer: the call waits for that second ask."""
    resolve = socket.getaddrinfo

    def second_ask(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host in ("embedding.example", b"embedding.example"):  # anyio asks with the name IDNA-encoded
            time.sleep(5.5)  # the first query lost, the second answered
            host = "127.0.0.1"
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", second_ask)
    async with raw_server(answers_only_the_first) as (url, requests):
        client = ServiceClient("embedding", url.replace("127.0.0.1", "embedding.example"), 30)
        assert await client.post("/v1/embed", {}, idempotent=True) == {"ok": True}
        await client.aclose()
    assert requests == [1]
