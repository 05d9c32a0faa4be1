"""Work for a request that stops when its client goes away.

Starlette does not cancel a handler whose client has disconnected: the work goes on and its answer is
thrown away. For long work (indexing a large document) that is work nobody waits for, and, one hop
further down, the calls it makes to other services go on too. ``unless_disconnected`` runs the work
beside a wait for the server's ``http.disconnect`` and cancels it when that comes first; the calls it had
in flight are closed with it, so the next service sees its own client go away and stops as well.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

import structlog
from starlette.requests import Request

log = structlog.get_logger(__name__)
T = TypeVar("T")

CLIENT_CLOSED = 499
"""The status noted (in metrics and logs; nobody receives it) for a request whose client went away."""


class ClientDisconnected(Exception):
    """The client went away before the work was done; the work has been cancelled. Answered (to no one)
    with ``CLIENT_CLOSED`` by the common error handlers."""


async def _disconnect(request: Request) -> None:
    # The body has been read by now (the route's parameters come from it): what the server hands on next is
    # the end of the connection, or nothing until the response is sent.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; ``ClientDisconnected`` when the client goes away first (``work`` is cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if task.cancelled():
        log.info("client_disconnected", path=request.url.path)
        raise ClientDisconnected(request.url.path)
    return task.result()
