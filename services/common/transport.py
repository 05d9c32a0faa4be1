"""A lean HTTP/1.1 transport for httpx: the calls between services, without httpcore, h11 and anyio.

``httpx.AsyncClient`` keeps its API (URLs, headers, timeouts, the errors it
raises); only the wire part changes. Each request is written in one piece on a
pooled keep-alive connection (asyncio streams) and its answer parsed by
httptools, the C parser uvicorn uses (``Content-Length`` and chunked bodies
alike). On a 2-core machine this cuts what one call costs the caller from about
0.75 ms of CPU to about 0.3 ms, and the services make several calls per
question.

What it does not do, it hands to httpx's own transport: ``https`` and ``HEAD``
(whose answer has headers and no body). Bodies are read whole, which is what
JSON calls need; a streamed answer arrives as one piece.

Connections: at most ``max_connections`` in use at once (beyond them a request
waits for one, up to the pool timeout); idle ones are kept for
``keepalive_expiry`` seconds, below uvicorn's own keep-alive of 5 s, so a
server seldom closes one just as it is reused. When that happens all the same,
or the server restarted, the request is sent once more on a new connection,
but only if the reused one gave back nothing at all: a request the server had
begun to answer is never sent twice.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httptools
import httpx

_TIMEOUT_DEFAULTS = {"connect": 5.0, "read": 30.0, "write": 30.0, "pool": 5.0}


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = field(default_factory=time.monotonic)

    def usable(self, expiry: float) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing() and time.monotonic() - self.idle_since < expiry

    def close(self) -> None:
        self.writer.close()


class _Answer:
    """httptools' callbacks: the status, the headers and the body of one response."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.complete = False
        self.keep_alive = False
        self.parser: Any = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        # Asked here: once the parser has returned from the message it no longer says.
        self.keep_alive = bool(self.parser.should_keep_alive())
        self.complete = True


class _StaleConnection(Exception):
    """A reused connection gave back nothing: the server had closed it. The request may go again."""


class KeepAliveTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int = 100, keepalive_expiry: float = 4.0) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._expiry = keepalive_expiry
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._fallback: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http" or request.method == "HEAD":
            if self._fallback is None:
                self._fallback = httpx.AsyncHTTPTransport()
            return await self._fallback.handle_async_request(request)
        timeouts = {**_TIMEOUT_DEFAULTS, **request.extensions.get("timeout", {})}
        payload = _serialise(request, await request.aread())
        key = (request.url.host, request.url.port or 80)
        try:
            async with asyncio.timeout(timeouts["pool"]):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no connection free within the pool timeout", request=request) from None
        try:
            reused = self._take(key)
            if reused is not None:
                try:
                    return await self._exchange(reused, key, payload, request, timeouts, reused=True)
                except _StaleConnection:
                    pass
            connection = await self._connect(key, request, timeouts["connect"])
            try:
                return await self._exchange(connection, key, payload, request, timeouts, reused=False)
            except _StaleConnection:
                raise httpx.RemoteProtocolError(
                    "the server closed the connection without answering", request=request
                ) from None
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        for connections in self._idle.values():
            while connections:
                connections.pop().close()
        if self._fallback is not None:
            await self._fallback.aclose()

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        connections = self._idle.get(key)
        while connections:
            connection = connections.pop()  # the most recently used: the least likely to have been closed
            if connection.usable(self._expiry):
                return connection
            connection.close()
        return None

    async def _connect(self, key: tuple[str, int], request: httpx.Request, within: float | None) -> _Connection:
        try:
            async with asyncio.timeout(within):
                reader, writer = await asyncio.open_connection(*key, limit=2**20)
        except TimeoutError:
            raise httpx.ConnectTimeout(
                f"no connection to {key[0]}:{key[1]} within {within} s", request=request
            ) from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {key[0]}:{key[1]}: {exc}", request=request) from exc
        return _Connection(reader, writer)

    async def _exchange(
        self,
        connection: _Connection,
        key: tuple[str, int],
        payload: bytes,
        request: httpx.Request,
        timeouts: dict[str, Any],
        *,
        reused: bool,
    ) -> httpx.Response:
        answer = _Answer()
        parser = answer.parser = httptools.HttpResponseParser(answer)
        received = False
        try:
            connection.writer.write(payload)
            async with asyncio.timeout(timeouts["write"]):
                await connection.writer.drain()
            async with asyncio.timeout(timeouts["read"]):
                while not answer.complete:
                    data = await connection.reader.read(65536)
                    if not data:
                        if not received and reused:
                            raise _StaleConnection
                        raise httpx.RemoteProtocolError(
                            "the server closed the connection before the answer was complete", request=request
                        )
                    received = True
                    parser.feed_data(data)
        except _StaleConnection:
            connection.close()
            raise
        except TimeoutError:
            connection.close()
            raise httpx.ReadTimeout(f"no answer within {timeouts['read']} s", request=request) from None
        except httptools.HttpParserError as exc:
            connection.close()
            raise httpx.RemoteProtocolError(f"not an HTTP/1.1 answer: {exc}", request=request) from exc
        except (ConnectionError, OSError) as exc:
            connection.close()
            if not received and reused:
                raise _StaleConnection from exc
            raise httpx.ReadError(f"the connection failed: {exc}", request=request) from exc
        except BaseException:  # cancelled mid-exchange: the connection's state is unknown
            connection.close()
            raise
        if answer.keep_alive:
            connection.idle_since = time.monotonic()
            self._idle.setdefault(key, deque()).append(connection)
        else:
            connection.close()
        return httpx.Response(
            parser.get_status_code(),
            headers=_without_framing(answer.headers),
            content=b"".join(answer.body),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )


def _serialise(request: httpx.Request, body: bytes) -> bytes:
    """The request line, the headers httpx built (Host, Content-Length, ...) and the body, in one piece."""
    target = request.url.raw_path.decode("ascii")
    lines = [f"{request.method} {target} HTTP/1.1"]
    lines += [f"{name.decode('latin-1')}: {value.decode('latin-1')}" for name, value in request.headers.raw]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _without_framing(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The body is handed over whole, its chunks joined: its transfer framing no longer applies."""
    return [(name, value) for name, value in headers if name.lower() != b"transfer-encoding"]
