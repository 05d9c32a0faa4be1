"""The embedding routes. ``/v1/embed`` is the hot path of every question and of ingestion: it reads the
body and writes the answer itself (one pydantic parse in, one orjson dump of the model's float32 arrays
out), instead of FastAPI's dependency solving, request validation and response re-validation, which
cost more per request than an HTTP hop on a small CPU. Its OpenAPI description is the same."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError

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


def _state(request: Request) -> tuple[State, Batcher]:
    state = request.scope.get("state", {}).get(STATE_KEY)
    if not isinstance(state, State):
        raise NotReady("the service has not finished starting")
    if state.batcher is None:
        raise NotReady(
            f"embedding model failed to load: {state.load_error}"
            if state.load_error
            else "embedding model is still loading"
        )
    return state, state.batcher


@router.post("/v1/embed", response_model=EmbedResponse, openapi_extra=_EMBED_BODY)
async def embed(request: Request) -> Response:
    state, batcher = _state(request)
    settings = state.settings
    try:
        body = EmbedRequest.model_validate_json(await request.body())
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


@router.get("/v1/info", response_model=InfoResponse)
async def info(batcher: BatcherDep) -> InfoResponse:
    model = batcher.embedder
    return InfoResponse(model=model.name, dimension=model.dimension, device=model.device)
