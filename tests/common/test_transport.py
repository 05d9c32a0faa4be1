"""KeepAliveTransport, the wire under ServiceClient: real servers (uvicorn, or a raw asyncio one that
misbehaves on purpose), real sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from services.common.errors import NotFound, UpstreamTimeout, UpstreamUnavailable
from services.common.http import ServiceClient
from services.common.transport import KeepAliveTransport
from tests.fixtures.uvicorn_server import free_port, serving


def echo_app(release: asyncio.Event | None = None) -> FastAPI:
    """``/slow`` answers once ``release`` is set."""
    app = FastAPI()
    released = release or asyncio.Event()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, object]:
        client = request.scope["client"]
        return {
            "body": await request.json(),
            "request_id": request.headers.get("x-request-id"),
            "client_port": client[1] if client else None,
        }

    @app.get("/chunked")
    async def chunked() -> StreamingResponse:
        async def parts() -> AsyncIterator[bytes]:
            for part in (b'{"parts": [', b'"a", ', b'"b"', b"]}"):
                yield part

        return StreamingResponse(parts(), media_type="application/json")

    @app.delete("/nothing", status_code=204)
    async def nothing() -> Response:
        return Response(status_code=204)

    @app.get("/closing")
    async def closing() -> Response:
        return Response(b'{"closed": true}', media_type="application/json", headers={"Connection": "close"})

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await released.wait()
        return {}

    return app


async def test_json_calls_share_one_keep_alive_connection_and_carry_the_request_id() -> None:
    async with serving(echo_app()) as url:
        client = ServiceClient("echo", url, 5)
        try:
            answers = [await client.post("/echo", {"n": n}, request_id=f"rid-{n}") for n in range(3)]
        finally:
            await client.aclose()
    assert [a["body"] for a in answers] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [a["request_id"] for a in answers] == ["rid-0", "rid-1", "rid-2"]
    assert len({a["client_port"] for a in answers}) == 1


async def test_chunked_empty_and_error_answers() -> None:
    async with serving(echo_app()) as url:
        client = ServiceClient("echo", url, 5)
        try:
            assert await client.get("/chunked") == {"parts": ["a", "b"]}
            assert await client.request("DELETE", "/nothing") is None
            with pytest.raises(NotFound):
                await client.get("/no-such-route")
            assert await client.get("/chunked") == {"parts": ["a", "b"]}  # the connection is still good
        finally:
            await client.aclose()


async def test_an_answer_that_closes_the_connection_is_not_reused() -> None:
    async with serving(echo_app()) as url:
        client = ServiceClient("echo", url, 5)
        try:
            assert await client.get("/closing") == {"closed": True}
            first = await client.post("/echo", {"n": 1})
            assert first["body"] == {"n": 1}
        finally:
            await client.aclose()


async def test_refused_and_slow_services_are_named_errors() -> None:
    refused = ServiceClient("gone", f"http://127.0.0.1:{free_port()}", 5)
    with pytest.raises(UpstreamUnavailable, match="gone is unavailable"):
        await refused.get("/x")
    await refused.aclose()
    release = asyncio.Event()
    async with serving(echo_app(release)) as url:
        slow = ServiceClient("slow", url, 0.3)
        with pytest.raises(UpstreamTimeout, match="slow did not answer in time"):
            await slow.get("/slow")
        await slow.aclose()
        release.set()  # the server finishes the request it still holds, so it can stop


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]
"""Answers (or not) the n-th request (1, 2, ...) of a connection; False closes the connection."""


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A server that reads each request's head and body and lets ``handler`` answer; yields its URL and the
    number of requests each connection has read so far."""
    requests: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        slot = len(requests)
        requests.append(0)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                await reader.readexactly(length)
                requests[slot] += 1
                if not await handler(reader, writer, requests[slot]):
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


def ok(writer: asyncio.StreamWriter) -> None:
    writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}')


async def test_a_keep_alive_connection_the_server_dropped_unanswered_is_replaced_and_the_request_sent_again() -> None:
    async def first_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> bool:
        if number == 1:
            ok(writer)
            return True
        return False  # the second request on this connection: closed without a word (keep-alive race)

    async with (
        raw_server(first_only) as (url, requests),
        httpx.AsyncClient(base_url=url, transport=KeepAliveTransport()) as client,
    ):
        assert (await client.post("/a", json={})).json() == {"ok": True}
        assert (await client.post("/b", json={})).json() == {"ok": True}
    assert requests == [2, 1]  # the first connection read both, answered one; a new one answered the second


async def test_a_request_whose_answer_broke_off_is_not_sent_twice() -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> bool:
        if number == 1:
            ok(writer)
            return True
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{"partial')
        await writer.drain()
        return False

    async with raw_server(half) as (url, requests):
        client = ServiceClient("half", url, 5)
        assert await client.post("/x", {}) == {"ok": True}
        with pytest.raises(UpstreamUnavailable, match="half is unavailable"):
            await client.post("/x", {})  # on the reused connection, which answers part and closes
        await client.aclose()
    assert requests == [2]  # not sent again on a new connection
