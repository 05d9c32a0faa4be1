"""The retriever's lifespan state and the one-line dependencies its handlers take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends

from services.common.deps import RequestIdDep, settings_getter, state_getter
from services.common.embedding import EmbeddingClient
from services.retriever.config import Settings
from services.retriever.indexing import DimensionCheck
from services.retriever.store import VectorStore
from services.retriever.text import KeywordEncoder

__all__ = [
    "DimensionsDep",
    "EmbeddingDep",
    "EncoderDep",
    "RequestIdDep",
    "SettingsDep",
    "State",
    "StateDep",
    "StoreDep",
]


@dataclass
class State:
    """What the retriever opens at start and closes at stop."""

    settings: Settings
    store: VectorStore
    embedding: EmbeddingClient
    encoder: KeywordEncoder
    dimensions: DimensionCheck


StateDep = Annotated[State, Depends(state_getter(State))]
SettingsDep = Annotated[Settings, Depends(settings_getter(Settings))]


async def get_dimensions(state: StateDep) -> DimensionCheck:
    """Every request that touches the store fails once the store is known to hold another model's vectors."""
    state.dimensions.raise_if_failed()
    return state.dimensions


async def get_store(state: StateDep, _: Annotated[DimensionCheck, Depends(get_dimensions)]) -> VectorStore:
    return state.store


async def get_embedding(state: StateDep) -> EmbeddingClient:
    return state.embedding


async def get_encoder(state: StateDep) -> KeywordEncoder:
    return state.encoder


StoreDep = Annotated[VectorStore, Depends(get_store)]
DimensionsDep = Annotated[DimensionCheck, Depends(get_dimensions)]
EmbeddingDep = Annotated[EmbeddingClient, Depends(get_embedding)]
EncoderDep = Annotated[KeywordEncoder, Depends(get_encoder)]
