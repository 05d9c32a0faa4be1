"""The gateway's own routes: /v1/ask (the plain and the streamed answer), adding documents, the web page."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sse_starlette import EventSourceResponse

from services.common.disconnect import unless_disconnected
from services.common.errors import InvalidInput, RagError
from services.gateway import pipeline
from services.gateway.deps import ClientsDep, Reader, RequestIdDep, RetrieverDep, SettingsDep, Writer
from services.gateway.pipeline import Answer, Pending, Question, Reset
from services.gateway.schemas import (
    AskRequest,
    AskResponse,
    DocumentsRequest,
    DocumentsResponse,
    error_responses,
)

log = structlog.get_logger(__name__)
router = APIRouter()
INDEX_HTML = Path(__file__).with_name("static") / "index.html"


@router.get("/", include_in_schema=False)
async def index(settings: SettingsDep) -> HTMLResponse:
    page = INDEX_HTML.read_text(encoding="utf-8").replace("__RAG_MIN_SUPPORT__", str(settings.min_support))
    return HTMLResponse(page)


@router.post(
    "/v1/documents",
    response_model=DocumentsResponse,
    dependencies=[Writer],
    responses=error_responses(400, 401, 403, 413, 422, 429, 502, 503, 504),
)
async def add_documents(
    body: DocumentsRequest, request: Request, settings: SettingsDep, retriever: RetrieverDep, rid: RequestIdDep
) -> DocumentsResponse:
    if len(body.documents) > settings.max_documents_per_request:
        raise InvalidInput(f"documents: at most {settings.max_documents_per_request} documents per request")
    for index, doc in enumerate(body.documents):
        if len(doc.text) > settings.max_document_chars:
            raise InvalidInput(f"documents.{index}.text: longer than {settings.max_document_chars} characters")
    # Chunk ids are deterministic: the same documents sent twice are written once. The wait grows with the
    # text sent (the retriever's work does); a caller that goes away stops the retriever's work with it.
    timeout = settings.ingest_timeout(sum(len(doc.text) for doc in body.documents))
    return await unless_disconnected(
        request,
        retriever.post(
            "/v1/documents",
            body.model_dump(),
            idempotent=True,
            request_id=rid,
            time_limit=timeout,
            model=DocumentsResponse,
        ),
    )


@router.post(
    "/v1/ask",
    response_model=AskResponse,
    dependencies=[Reader],
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream is true"},
        **error_responses(400, 401, 403, 413, 422, 429, 502, 503, 504),
    },
)
async def ask(body: AskRequest, settings: SettingsDep, clients: ClientsDep, rid: RequestIdDep, request: Request) -> Any:
    question = Question(body.question, body.top_k, body.filters, stream=body.stream)
    pending = await pipeline.ask(question, settings, clients, rid)
    if body.stream:
        return EventSourceResponse(_events(pending), headers=SSE_HEADERS, sep="\n")
    answer = await unless_disconnected(request, pending.answer())  # a client gone first cancels it: 499
    return answer.response


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _event(name: str, data: dict[str, Any]) -> dict[str, str]:
    """One event as sse-starlette writes it: its name and its data as compact JSON."""
    return {"event": name, "data": json.dumps(data, separators=(",", ":"))}


async def _events(pending: Pending) -> AsyncIterator[dict[str, str]]:
    """``token`` events in order; ``reset`` if a retry restarts the answer; then ``done`` (or ``error``).

    ``done`` carries the same body as the plain answer: sources, citations, grounded, timings."""
    try:
        async for item in pending.stream():
            if isinstance(item, Answer):
                yield _event("done", item.response.model_dump(mode="json"))
            elif isinstance(item, Reset):
                yield _event("reset", {"attempt": item.attempt})
            else:
                yield _event("token", {"text": item.text})
    except RagError as exc:
        yield _event("error", {"error": exc.error, "detail": exc.detail})
    except Exception:  # the status line is sent: the failure goes in the stream
        log.exception("unhandled_error", path="/v1/ask", request_id=pending.request_id)
        detail = f"the service failed on this request (request id {pending.request_id}); it has been logged"
        yield _event("error", {"error": "internal_error", "detail": detail})
