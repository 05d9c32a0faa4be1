"""The gateway's lifespan state and the one-line dependencies its handlers take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis

from services.common.deps import RequestIdDep, settings_getter, state_getter
from services.common.embedding import EmbeddingClient
from services.common.http import ServiceClient
from services.common.queue import JobQueue
from services.gateway.config import Settings
from services.gateway.files import FileParser
from services.gateway.pipeline import Clients
from services.gateway.security import Guard, require
from services.gateway.tenants import TENANT_HEADER, Caller

__all__ = [
    "CallerDep",
    "ClientsDep",
    "EmbeddingDep",
    "FileParserDep",
    "Guarded",
    "QueueDep",
    "Reader",
    "RequestIdDep",
    "RetrieverDep",
    "SettingsDep",
    "State",
    "StateDep",
    "Writer",
    "guard",
]


@dataclass
class State:
    """What the gateway opens at start and closes at stop."""

    settings: Settings
    redis: Redis
    queue: JobQueue
    retriever: ServiceClient
    embedding: EmbeddingClient  # attribution's sentence vectors, with the GPU-to-CPU spill
    guard: Guard
    files: FileParser  # parses uploads in worker processes


StateDep = Annotated[State, Depends(state_getter(State))]
SettingsDep = Annotated[Settings, Depends(settings_getter(Settings))]


async def guard(request: Request, state: StateDep) -> Caller:
    """API key and rate limits; the caller's tenant and scopes. Run once per request (FastAPI caches it)."""
    return await state.guard.check(request)


CallerDep = Annotated[Caller, Depends(guard)]


async def reader(caller: CallerDep) -> None:
    require(caller, "read")


async def writer(caller: CallerDep) -> None:
    require(caller, "write")


async def get_retriever(state: StateDep, caller: CallerDep) -> ServiceClient:
    """The retriever, every call of it on behalf of the caller's tenant."""
    return state.retriever.with_headers({TENANT_HEADER: caller.tenant})


async def get_embedding(state: StateDep) -> EmbeddingClient:
    return state.embedding


async def get_queue(state: StateDep) -> JobQueue:
    return state.queue


async def get_clients(state: StateDep, retriever: Annotated[ServiceClient, Depends(get_retriever)]) -> Clients:
    return Clients(retriever, state.embedding, state.queue)


async def get_file_parser(state: StateDep) -> FileParser:
    return state.files


RetrieverDep = Annotated[ServiceClient, Depends(get_retriever)]
EmbeddingDep = Annotated[EmbeddingClient, Depends(get_embedding)]
ClientsDep = Annotated[Clients, Depends(get_clients)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
FileParserDep = Annotated[FileParser, Depends(get_file_parser)]
Guarded = Depends(guard)
"""Any valid key (the chain's status); the routes of the API take ``Reader`` or ``Writer``."""
Reader = Depends(reader)
"""Ask, search, chat, models, list and get documents: the ``read`` scope."""
Writer = Depends(writer)
"""Ingest documents or files, delete them: the ``write`` scope."""
