from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from services.common.errors import InvalidInput, NotReady
from services.embedding.config import Settings
from services.embedding.model import Batcher
from services.embedding.schemas import EmbedRequest, EmbedResponse, InfoResponse

router = APIRouter()


def get_batcher(request: Request) -> Batcher:
    batcher: Batcher | None = request.app.state.batcher
    if batcher is None:
        raise NotReady("embedding model is still loading")
    return batcher


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


BatcherDep = Annotated[Batcher, Depends(get_batcher)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


@router.post("/v1/embed", response_model=EmbedResponse)
async def embed(body: EmbedRequest, batcher: BatcherDep, settings: SettingsDep) -> EmbedResponse:
    if len(body.texts) > settings.embedding_max_texts:
        raise InvalidInput(f"texts: at most {settings.embedding_max_texts} texts per request")
    for index, text in enumerate(body.texts):
        if not text.strip():
            raise InvalidInput(f"texts.{index}: must not be empty")
        if len(text) > settings.embedding_max_text_chars:
            raise InvalidInput(f"texts.{index}: longer than {settings.embedding_max_text_chars} characters")
    vectors = await batcher.embed(body.texts)
    model = batcher.embedder
    return EmbedResponse(vectors=vectors, model=model.name, dimension=model.dimension, device=model.device)


@router.get("/v1/info", response_model=InfoResponse)
async def info(batcher: BatcherDep) -> InfoResponse:
    model = batcher.embedder
    return InfoResponse(model=model.name, dimension=model.dimension, device=model.device)
