from __future__ import annotations

from fastapi import APIRouter

from services.common.batcher import BatcherFull
from services.common.errors import InvalidInput, QueueFull
from services.embedding.deps import BatcherDep, SettingsDep
from services.embedding.metrics import REJECTED, REQUESTS_IN_FLIGHT
from services.embedding.schemas import EmbedRequest, EmbedResponse, InfoResponse

router = APIRouter()


@router.post("/v1/embed", response_model=EmbedResponse)
async def embed(body: EmbedRequest, batcher: BatcherDep, settings: SettingsDep) -> EmbedResponse:
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
    return EmbedResponse(vectors=vectors, model=model.name, dimension=model.dimension, device=model.device)


@router.get("/v1/info", response_model=InfoResponse)
async def info(batcher: BatcherDep) -> InfoResponse:
    model = batcher.embedder
    return InfoResponse(model=model.name, dimension=model.dimension, device=model.device)
