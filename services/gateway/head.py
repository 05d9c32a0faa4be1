"""``HEAD`` on every ``GET`` route: the same status and headers as ``GET``, without the body.

FastAPI routes answer only the methods they declare, so a ``HEAD`` (a link checker, a load balancer, ``curl
-I``) got 405. This middleware asks the route for ``GET`` and sends its status and headers, dropping the
body; a route without ``GET`` still answers 405.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        ended = False

        async def without_body(message: Message) -> None:
            nonlocal ended
            if message["type"] == "http.response.body":
                if ended:
                    return
                if message.get("more_body", False):
                    return  # a streamed body: nothing of it is sent, its end is
                ended = True
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)
