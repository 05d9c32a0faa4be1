"""Every service's server closes a connection that does not send its request, or its body, in time
(RAG_REQUEST_READ_TIMEOUT_SECONDS); a handler waiting for that body sees the client gone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import uvicorn
from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect

from ragpod.processes import free_port
from services.common.serve import server_options
from services.common.settings import ServiceSettings
from tests.fixtures.llm import wait_for

DEADLINE = 0.5


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, list[str]]]:
    seen: list[str] = []
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        try:
            body = await request.body()
        except ClientDisconnect:
            seen.append("client gone")
            raise
        return {"bytes": len(body)}

    port = free_port()
    settings = ServiceSettings(port=port, request_read_timeout_seconds=DEADLINE)
    server = uvicorn.Server(uvicorn.Config(app, **server_options(settings)))
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    await wait_for(started)
    try:
        yield port, seen
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


async def closed_after(port: int, send: bytes) -> float:
    """Opens a connection, sends ``send`` and waits for the server to close it; the seconds that took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(send)
    await writer.drain()
    try:
        assert await asyncio.wait_for(reader.read(), 20) == b""  # closed, with nothing sent back
    finally:
        writer.close()
    return time.monotonic() - started


async def test_a_silent_connection_is_closed_after_the_deadline(server: tuple[int, list[str]]) -> None:
    port, _ = server
    assert await closed_after(port, b"") >= DEADLINE * 0.9


async def test_headers_that_never_end_are_closed_after_the_deadline(server: tuple[int, list[str]]) -> None:
    port, _ = server
    assert await closed_after(port, b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Slow: ") >= DEADLINE * 0.9


async def test_a_body_shorter_than_its_length_is_closed_and_its_handler_sees_the_client_gone(
    server: tuple[int, list[str]],
) -> None:
    port, seen = server
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n"
    assert await closed_after(port, head + b"x" * 10) >= DEADLINE * 0.9
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.05)
    assert seen == ["client gone"]


async def test_a_request_sent_in_time_is_answered_and_the_connection_kept_for_the_next(
    server: tuple[int, list[str]],
) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(2):
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(DEADLINE / 5)
            writer.write(b"abc")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))[15:])
            assert await reader.readexactly(length) == b'{"bytes":3}'
    finally:
        writer.close()
