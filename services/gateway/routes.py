from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
from fastapi import APIRouter
from fastapi.responses import HTMLResponse, StreamingResponse

from services.common.errors import GenerationFailed, InvalidInput, RagError
from services.common.http import ServiceClient
from services.common.queue import JobQueue
from services.gateway.config import Settings
from services.gateway.deps import Guarded, QueueDep, RequestIdDep, RetrieverDep, SettingsDep
from services.gateway.pipeline import Prepared, answered, follow, not_covered, prepare, raise_for_error
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
    dependencies=[Guarded],
    responses=error_responses(400, 401, 413, 422, 429, 502, 503, 504),
)
async def add_documents(
    body: DocumentsRequest, settings: SettingsDep, retriever: RetrieverDep, rid: RequestIdDep
) -> DocumentsResponse:
    if len(body.documents) > settings.max_documents_per_request:
        raise InvalidInput(f"documents: at most {settings.max_documents_per_request} documents per request")
    for index, doc in enumerate(body.documents):
        if len(doc.text) > settings.max_document_chars:
            raise InvalidInput(f"documents.{index}.text: longer than {settings.max_document_chars} characters")
    return await retriever.post("/v1/documents", body.model_dump(), request_id=rid, model=DocumentsResponse)


def _check_ask(body: AskRequest, settings: Settings) -> None:
    if body.top_k > settings.top_k_max:
        raise InvalidInput(f"top_k: must be between 1 and {settings.top_k_max}")
    if len(body.question) > settings.max_question_chars:
        raise InvalidInput(f"question: longer than {settings.max_question_chars} characters")


@router.post(
    "/v1/ask",
    response_model=AskResponse,
    dependencies=[Guarded],
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream is true"},
        **error_responses(400, 401, 413, 422, 429, 502, 503, 504),
    },
)
async def ask(
    body: AskRequest, settings: SettingsDep, retriever: RetrieverDep, queue: QueueDep, rid: RequestIdDep
) -> Any:
    _check_ask(body, settings)
    prepared = await prepare(body, settings, retriever, queue, rid)
    if prepared.job is None:  # no source reached the relevance floor: answered at once, nothing queued
        response = not_covered(prepared)
        return _sse_response(_sse_at_once(response)) if body.stream else response
    if body.stream:
        return _sse_response(_sse(queue, prepared, settings, retriever, rid))
    async for event in follow(queue, prepared):
        if event.type in ("done", "error"):
            raise_for_error(event)
            return await answered(prepared, event, settings, retriever, rid)
    raise GenerationFailed("the job's events ended without an answer")


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _sse_at_once(response: AskResponse) -> AsyncIterator[str]:
    """An answer known without generation, as the same events a generated one has."""
    yield _event("token", {"text": response.answer})
    yield _event("done", response.model_dump())


async def _sse(
    queue: JobQueue, prepared: Prepared, settings: Settings, retriever: ServiceClient, rid: str
) -> AsyncIterator[str]:
    """token events in order; ``reset`` if a retry restarts the answer; then ``done`` (or ``error``).

    ``done`` carries the same body as the plain answer: sources, citations, grounded, timings."""
    attempt = 0
    try:
        async for event in follow(queue, prepared):
            if event.type == "token":
                if event.attempt > attempt:  # a retry started over: the client drops what it has shown
                    if attempt:
                        yield _event("reset", {"attempt": event.attempt})
                    attempt = event.attempt
                if event.attempt == attempt:
                    yield _event("token", {"text": event.data["text"]})
            elif event.type == "done":
                if event.attempt != attempt:  # another attempt than the one shown won: show its answer whole
                    if attempt:
                        yield _event("reset", {"attempt": event.attempt})
                    if event.data["answer"]:
                        yield _event("token", {"text": event.data["answer"]})
                full = await answered(prepared, event, settings, retriever, rid)
                yield _event("done", full.model_dump())
            else:
                yield _event("error", {"error": "generation_failed", "detail": event.data.get("detail", "")})
    except RagError as exc:
        yield _event("error", {"error": exc.error, "detail": exc.detail})
