"""One error hierarchy for every service, rendered as ``{"error", "detail"}``.

Each subclass fixes a status and a kind; nothing changes them on an instance.
Transport failures are translated into these where another service is called
(``services.common.http``), never inside route handlers. Starlette's own
errors (404, 405, 413, ...) and request validation come out in the same shape,
and anything unexpected is a bug: logged with its traceback and answered 500
``internal_error`` naming the request id, never with the trace. 502, 503 and
504 are kept for the designed failures (a dependency down, a bound reached, a
deadline), so a client and an autoscaler can tell a bug from load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from http import HTTPStatus

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.disconnect import CLIENT_CLOSED, ClientDisconnected

log = structlog.get_logger(__name__)


class RagError(Exception):
    """The base of every error a service answers with; subclasses fix the status and the kind."""

    status_code = 503
    error = "unavailable"

    upstream_status: int | None = None
    """The status another service answered, when this error carries that answer on (``http.translate``)."""

    def __init__(self, detail: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})


class Unauthorized(RagError):
    status_code = 401
    error = "unauthorized"


class Forbidden(RagError):
    """Authenticated, but the key may not do this (it lacks the scope)."""

    status_code = 403
    error = "forbidden"


class BadRequest(RagError):
    status_code = 400
    error = "bad_request"


class NotFound(RagError):
    status_code = 404
    error = "not_found"


class Conflict(RagError):
    status_code = 409
    error = "conflict"


class PayloadTooLarge(RagError):
    status_code = 413
    error = "payload_too_large"


class MethodNotAllowed(RagError):
    status_code = 405
    error = "method_not_allowed"


class UnsupportedMediaType(RagError):
    status_code = 415
    error = "unsupported_media_type"


class InvalidInput(RagError):
    status_code = 422
    error = "validation_error"


class FileTooComplex(RagError):
    """An uploaded file over one of the parsing limits; the detail names the limit's setting."""

    status_code = 422
    error = "file_too_complex"


class TooManyRequests(RagError):
    status_code = 429
    error = "rate_limited"


class UpstreamUnavailable(RagError):
    """A dependency (another service, Redis, Qdrant, the model) is down."""

    status_code = 503
    error = "upstream_unavailable"


class QueueFull(RagError):
    status_code = 503
    error = "queue_full"


class Busy(RagError):
    """A bounded resource is full (this process's Redis connections or requests in flight, the job queue's
    memory): a retry later can succeed."""

    status_code = 503
    error = "busy"


class NotReady(RagError):
    status_code = 503
    error = "not_ready"


class DimensionMismatch(RagError):
    """The vector store holds vectors of another size than the model makes: every request says both sizes."""

    status_code = 503
    error = "dimension_mismatch"

    def __init__(self, store: int, model: int, *, collection: str = "") -> None:
        where = f"collection {collection!r}" if collection else "the vector store"
        super().__init__(
            f"{where} holds vectors of size {store} but the embedding model makes vectors of size {model}; "
            "re-index into a new collection or configure the model the collection was built with"
        )
        self.store = store
        self.model = model


class UpstreamError(RagError):
    """A dependency answered, but with a failure or an answer that makes no sense."""

    status_code = 502
    error = "upstream_error"


class UpstreamTimeout(RagError):
    status_code = 504
    error = "upstream_timeout"


class DeadlineExceeded(RagError):
    status_code = 504
    error = "deadline_exceeded"


class GenerationFailed(RagError):
    status_code = 502
    error = "generation_failed"


class Internal(RagError):
    """Anything no other error describes, a bug: logged with its traceback, answered 500 without it."""

    status_code = 500
    error = "internal_error"


def _field_path(loc: tuple[int | str, ...]) -> str:
    where, *rest = loc or ("body",)
    parts = [str(p) for p in rest] if where in ("body", "query", "path", "header") else [str(where), *map(str, rest)]
    return ".".join(parts) or str(where)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _validation_message(exc: RequestValidationError) -> tuple[str, list[dict[str, str]]]:
    """One entry per field; the alternatives of a union are folded into one message."""
    by_field: dict[str, list[str]] = {}
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        while len(loc) > 1 and str(loc[-1]).split("[")[0] in _UNION_TAGS:
            loc = loc[:-1]
        by_field.setdefault(_field_path(loc), []).append(str(err.get("msg", "invalid value")))
    fields = [{"field": f, "message": " or ".join(dict.fromkeys(msgs))} for f, msgs in by_field.items()]
    detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields) or "invalid request"
    return detail, fields


ErrorRenderer = Callable[[RagError, Mapping[str, object]], Response]
"""Renders one error in another shape than ``{"error", "detail"}`` (OpenAI's, under its routes)."""


BY_STATUS: Mapping[int, type[RagError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidInput,
    429: TooManyRequests,
}
"""The error class of each client-error status; any other 4xx is a ``BadRequest``."""

_DEFAULT_DETAIL = {
    404: "no such route",
    405: "method not allowed on this route",
    413: "request body too large",
}


def _from_http(exc: HTTPException) -> RagError:
    """Starlette's own HTTPException (404, 405, 413, ...) carried into the hierarchy."""
    if exc.status_code >= 500:
        return Internal("internal error")
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = ""
    detail = exc.detail if exc.detail and exc.detail != phrase else _DEFAULT_DETAIL.get(exc.status_code, phrase.lower())
    return BY_STATUS.get(exc.status_code, BadRequest)(detail or "bad request", headers=exc.headers)


def _renderer(shapes: Mapping[str, ErrorRenderer] | None) -> Callable[..., Response]:
    renderers = dict(shapes or {})

    def render(request: Request, exc: RagError, extra: Mapping[str, object] | None = None) -> Response:
        for prefix, renderer in renderers.items():
            if request.url.path.startswith(prefix):
                return renderer(exc, extra or {})
        return JSONResponse(
            {"error": exc.error, "detail": exc.detail, **(extra or {})},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    return render


def internal_error(request_id: str) -> Internal:
    """What a client is told of a bug: that it happened, and the request id that finds its traceback in the logs."""
    if not request_id:
        return Internal("the service failed on this request; it has been logged")
    return Internal(f"the service failed on this request (request id {request_id}); it has been logged")


def _request_id(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", ""))


def install_error_handlers(app: FastAPI, shapes: Mapping[str, ErrorRenderer] | None = None) -> None:
    """Every error answered in one shape; ``shapes`` maps a path prefix to another renderer."""
    render = _renderer(shapes)

    @app.exception_handler(RagError)
    async def _rag_error(request: Request, exc: RagError) -> Response:
        return render(request, exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        return render(request, _from_http(exc))

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the metrics count it

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        detail, fields = _validation_message(exc)
        return render(request, InvalidInput(detail), {"fields": fields})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # The last resort, from Starlette's outermost middleware (UnexpectedErrorMiddleware answers first).
        request_id = _request_id(request.scope)
        log.exception("unhandled_error", path=request.url.path, error_type=type(exc).__name__, request_id=request_id)
        return render(request, internal_error(request_id))


class UnexpectedErrorMiddleware:
    """Answers an exception nothing else handled, a bug, as a 500 ``internal_error`` naming the request id,
    and logs its traceback.

    Added inside the request id and metrics middlewares, so the answer carries the id, is counted as a
    500, and the log line is bound to the request; Starlette's own handler for ``Exception`` would answer
    from outside them and raise the exception again to the server. Once a response has started (a stream),
    nothing can be answered any more: the exception goes on to the server, which closes the connection."""

    def __init__(self, app: ASGIApp, shapes: Mapping[str, ErrorRenderer] | None = None) -> None:
        self.app = app
        self.render = _renderer(shapes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if started:
                raise
            log.exception("unhandled_error", path=scope.get("path", ""), error_type=type(exc).__name__)
            response = self.render(Request(scope), internal_error(_request_id(scope)))
            await response(scope, receive, send)
