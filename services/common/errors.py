"""One error hierarchy for every service, rendered as ``{"error", "detail"}``.

Transport failures are translated into these where another service is called
(``services.common.http``), never inside route handlers; a response never
carries a stack trace.
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

log = structlog.get_logger(__name__)


class RagError(Exception):
    status_code = 500
    error = "internal_error"

    def __init__(self, detail: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})


class Unauthorized(RagError):
    status_code = 401
    error = "unauthorized"


class InvalidInput(RagError):
    status_code = 422
    error = "validation_error"


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


class NotReady(RagError):
    status_code = 503
    error = "not_ready"


class UpstreamTimeout(RagError):
    status_code = 504
    error = "upstream_timeout"


class DeadlineExceeded(RagError):
    status_code = 504
    error = "deadline_exceeded"


class GenerationFailed(RagError):
    status_code = 502
    error = "generation_failed"


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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RagError)
    async def _rag_error(_: Request, exc: RagError) -> JSONResponse:
        return JSONResponse(
            {"error": exc.error, "detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail, fields = _validation_message(exc)
        return JSONResponse({"error": "validation_error", "detail": detail, "fields": fields}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", path=request.url.path, error_type=type(exc).__name__)
        return JSONResponse({"error": "internal_error", "detail": "internal error"}, status_code=500)
