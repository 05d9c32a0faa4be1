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
from services.gateway.security import Guard

__all__ = [
    "ClientsDep",
    "EmbeddingDep",
    "FileParserDep",
    "Guarded",
    "QueueDep",
    "RequestIdDep",
    "RetrieverDep",
    "SettingsDep",
    "State",
    "StateDep",
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

    @property
    def clients(self) -> Clients:
        return Clients(self.retriever, self.embedding, self.queue)


StateDep = Annotated[State, Depends(state_getter(State))]
SettingsDep = Annotated[Settings, Depends(settings_getter(Settings))]


async def get_retriever(state: StateDep) -> ServiceClient:
    return state.retriever


async def get_embedding(state: StateDep) -> EmbeddingClient:
    return state.embedding


async def get_queue(state: StateDep) -> JobQueue:
    return state.queue


async def get_clients(state: StateDep) -> Clients:
    return state.clients


async def get_file_parser(state: StateDep) -> FileParser:
    return state.files


async def guard(request: Request, state: StateDep) -> None:
    """API key and rate limit; routes take it as ``dependencies=[Guarded]``."""
    await state.guard.check(request)


RetrieverDep = Annotated[ServiceClient, Depends(get_retriever)]
EmbeddingDep = Annotated[EmbeddingClient, Depends(get_embedding)]
ClientsDep = Annotated[Clients, Depends(get_clients)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
FileParserDep = Annotated[FileParser, Depends(get_file_parser)]
Guarded = Depends(guard)
