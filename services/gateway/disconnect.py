"""A plain (not streamed) answer that stops when its client goes away.

A streamed answer stops by itself: the server cancels it when the client disconnects. A plain one is not
told, so its handler waits for the answer while it also waits for the client's ``http.disconnect``; whichever
comes first wins. A client gone first cancels the wait, which marks the job abandoned (``Pending._follow``),
so no worker goes on generating an answer nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog
from starlette.requests import Request
from starlette.responses import Response

T = TypeVar("T")

log = structlog.get_logger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request its client closed; nobody receives it


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | Response:
    """``work``'s result, or, when the client disconnects first, ``work`` cancelled and a 499 nobody reads."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # its clean-up (the job marked abandoned) before the handler ends
    log.info("client_disconnected", path=request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: ``receive`` waits for nothing else)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
