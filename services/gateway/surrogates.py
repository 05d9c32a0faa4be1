"""Text that enters through the API is valid Unicode, or the request is a 422 naming the field.

JSON may spell a code point that is not a character: a lone surrogate (``"\\ud800"``). Python's JSON parser
hands it on inside a ``str``, and it fails only later, when something encodes that string (the call to the
retriever, a log line). One check at the edge, a middleware in front of every route, refuses it instead:
a body that spells a surrogate escape is parsed once more and walked, and the first string holding a lone
surrogate is named. Bodies without such an escape (nearly all) cost one scan of their bytes. JSON carried
inside a form field (``/v1/files``' ``metadata``) is walked where it is parsed, with the same function.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import ErrorRenderer, InvalidInput
from services.gateway.metrics import REJECTED

# A JSON escape of a UTF-16 surrogate, high (D800-DBFF) or low (DC00-DFFF). Pairs are fine (they spell one
# character); a match only means the body is worth a closer look.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_FORMS = (b"multipart/form-data", b"application/x-www-form-urlencoded")
MESSAGE = "must be valid Unicode text (it holds a lone surrogate)"


def _invalid(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _printable(part: str) -> str:
    return part.encode("utf-8", "backslashreplace").decode("utf-8")


def lone_surrogate(value: Any, path: tuple[str, ...] = ()) -> str | None:
    """The dotted path of the first string (a key or a value) in ``value`` holding a lone surrogate, else None."""
    if isinstance(value, str):
        return ".".join(path) if _invalid(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = (*path, _printable(str(key)))
            if isinstance(key, str) and _invalid(key):
                return ".".join(where)
            found = lone_surrogate(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = lone_surrogate(item, (*path, str(index)))
            if found is not None:
                return found
    return None


def check_text(value: Any, field: str = "") -> None:
    """Raises ``InvalidInput`` naming the field when ``value`` holds a lone surrogate."""
    found = lone_surrogate(value, (field,) if field else ())
    if found is not None:
        raise InvalidInput(f"{found or 'body'}: {MESSAGE}")


class UnicodeMiddleware:
    """Refuses, with a 422 naming the field, a JSON body that holds a lone surrogate."""

    def __init__(self, app: ASGIApp, shapes: Mapping[str, ErrorRenderer] | None = None) -> None:
        self.app = app
        self.shapes = dict(shapes or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        content_type = dict(scope["headers"]).get(b"content-type", b"").lower()
        if content_type.startswith(_FORMS):  # files and form fields: checked where their JSON is parsed
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay(message, receive), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if _SURROGATE_ESCAPE.search(body) is not None:
            try:
                check_text(json.loads(body))
            except InvalidInput as exc:
                REJECTED.labels("invalid_unicode").inc()
                await self._refuse(exc, scope, receive, send)
                return
            except ValueError:  # not JSON: the route's own parsing says so
                pass
        await self.app(scope, _replay({"type": "http.request", "body": body, "more_body": False}, receive), send)

    async def _refuse(self, error: InvalidInput, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        field = error.detail.split(": ", 1)[0]
        renderer = next((r for prefix, r in self.shapes.items() if path.startswith(prefix)), None)
        fields = [{"field": field, "message": MESSAGE}]
        response: Response = (
            renderer(error, {"fields": fields})
            if renderer is not None
            else JSONResponse(
                {"error": error.error, "detail": error.detail, "fields": fields}, status_code=error.status_code
            )
        )
        await response(scope, receive, send)


def _replay(first: Message, receive: Receive) -> Receive:
    """``receive`` that hands ``first`` (the body read here, or the message that ended it) on, then the server's."""
    pending = [first]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay
