"""The retriever's lifespan state and the one-line dependencies its handlers take."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header

from services.common.deps import RequestIdDep, settings_getter, state_getter
from services.common.embedding import EmbeddingClient
from services.common.errors import InvalidInput
from services.common.tenants import DEFAULT_TENANT, TENANT_HEADER, TENANT_PATTERN
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
    "TenantDep",
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


async def get_tenant(
    tenant: Annotated[
        str | None,
        Header(alias=TENANT_HEADER, description="Whose documents the call reads or writes; absent: the default."),
    ] = None,
) -> str:
    """The tenant the caller acts for. The retriever trusts its callers (only the gateway and the re-index job
    reach it); a call without the header is the default tenant's."""
    if tenant is None:
        return DEFAULT_TENANT
    if not re.fullmatch(TENANT_PATTERN, tenant):
        raise InvalidInput(f"{TENANT_HEADER}: not a tenant name ({TENANT_PATTERN})")
    return tenant


StoreDep = Annotated[VectorStore, Depends(get_store)]
TenantDep = Annotated[str, Depends(get_tenant)]
DimensionsDep = Annotated[DimensionCheck, Depends(get_dimensions)]
EmbeddingDep = Annotated[EmbeddingClient, Depends(get_embedding)]
EncoderDep = Annotated[KeywordEncoder, Depends(get_encoder)]
