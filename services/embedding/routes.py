"""The embedding routes. ``/v1/embed`` is the hot path of every question and of ingestion.

Its work (``embed_answer``: one pydantic parse in, one orjson dump of the
model's float32 arrays out) runs ahead of FastAPI's router, in
``EmbedFastPath``: the innermost of the service's middlewares, so the request
id, the HTTP metrics and the error handlers apply as to any route, while
FastAPI's own layers (its exception and exit-stack middlewares, routing,
dependency solving, request and response validation) are skipped. Those
layers cost CPU on every request, and under many concurrent callers that CPU
is time the model waits for the next batch's requests (``bench/embedding.py``
measures the whole path). The route stays
registered for the OpenAPI description and calls the same ``embed_answer``.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.batcher import BatcherFull
from services.common.deps import STATE_KEY
from services.common.errors import InvalidInput, NotReady, QueueFull
from services.embedding.deps import BatcherDep, State
from services.embedding.metrics import REJECTED, REQUESTS_IN_FLIGHT
from services.embedding.model import Batcher
from services.embedding.schemas import EmbedRequest, EmbedResponse, InfoResponse

router = APIRouter()

_EMBED_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": EmbedRequest.model_json_schema()}},
    }
}


EMBED_PATH = "/v1/embed"


def _state(scope: Scope) -> tuple[State, Batcher]:
    state = scope.get("state", {}).get(STATE_KEY)
    if not isinstance(state, State):
        raise NotReady("the service has not finished starting")
    if state.batcher is None:
        raise NotReady(
            f"embedding model failed to load: {state.load_error}"
            if state.load_error
            else "embedding model is still loading"
        )
    return state, state.batcher


async def embed_answer(scope: Scope, raw: bytes) -> Response:
    """One ``POST /v1/embed``, from its body to its answer; raises the ``RagError`` to answer instead."""
    state, batcher = _state(scope)
    settings = state.settings
    try:
        body = EmbedRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None
    if len(body.texts) > settings.embedding_max_texts:
        raise InvalidInput(f"texts: at most {settings.embedding_max_texts} texts per request")
    for index, text in enumerate(body.texts):
        if not text.strip():
            raise InvalidInput(f"texts.{index}: must not be empty")
        if len(text) > settings.embedding_max_text_chars:
            raise InvalidInput(f"texts.{index}: longer than {settings.embedding_max_text_chars} characters")
    with REQUESTS_IN_FLIGHT.track_inprogress():
        try:
            vectors = await batcher.embed(body.texts)
        except BatcherFull as exc:
            REJECTED.inc()
            raise QueueFull(
                f"embedding: {exc.pending} texts would wait, more than RAG_EMBEDDING_MAX_PENDING={exc.limit}",
                headers={"Retry-After": str(settings.embedding_retry_after_seconds)},
            ) from exc
    model = batcher.embedder
    answer = {"vectors": vectors, "model": model.name, "dimension": model.dimension, "device": model.device}
    return Response(orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


@router.post(EMBED_PATH, response_model=EmbedResponse, openapi_extra=_EMBED_BODY)
async def embed(request: Request) -> Response:
    return await embed_answer(request.scope, await request.body())


class EmbedFastPath:
    """``POST /v1/embed`` answered by ``embed_answer`` before FastAPI's router; every other request passes on.

    Added before the common middlewares, so it runs inside them (request id, metrics). An error is
    answered by the app's own exception handlers, as the router would: the same shape and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.route = next(r for r in router.routes if isinstance(r, APIRoute) and r.path == EMBED_PATH)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != EMBED_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # what routing would have set: the metrics label requests by its path
        request = Request(scope, receive)
        try:
            response = await embed_answer(scope, await request.body())
        except Exception as exc:
            handler = next(
                (found for cls in type(exc).__mro__ if (found := scope["app"].exception_handlers.get(cls))), None
            )
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)


@router.get("/v1/info", response_model=InfoResponse)
async def info(batcher: BatcherDep) -> InfoResponse:
    model = batcher.embedder
    return InfoResponse(model=model.name, dimension=model.dimension, device=model.device)
