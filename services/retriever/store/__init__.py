"""One ``VectorStore`` interface, two backends.

- ``EdgeStore``: Qdrant Edge in process (HNSW, write-ahead log) on
  ``RAG_QDRANT_PATH``, the embedded default.
- ``ServerStore``: a Qdrant server at ``RAG_QDRANT_URL`` through the async
  qdrant-client, the choice for clusters.
"""

from __future__ import annotations

import asyncio

from qdrant_client import AsyncQdrantClient

from services.common.errors import DimensionMismatch
from services.retriever.config import Settings
from services.retriever.store.base import (
    ChunkPoint,
    DocumentInfo,
    Fusion,
    LegacyStore,
    SearchMode,
    VectorStore,
)
from services.retriever.store.edge import EdgeStore
from services.retriever.store.server import Replication, ServerStore

__all__ = [
    "ChunkPoint",
    "DimensionMismatch",
    "DocumentInfo",
    "EdgeStore",
    "Fusion",
    "LegacyStore",
    "Replication",
    "SearchMode",
    "ServerStore",
    "VectorStore",
    "open_store",
    "replication_of",
]


def replication_of(settings: Settings) -> Replication:
    return Replication(
        replication_factor=settings.qdrant_replication_factor,
        shards=settings.qdrant_shards,
        write_consistency=settings.qdrant_write_consistency,
    )


async def open_store(settings: Settings) -> VectorStore:
    """The backend the settings name; connects to nothing that might be down."""
    if settings.qdrant_url:
        client = AsyncQdrantClient(url=settings.qdrant_url, api_key=settings.qdrant_api_key or None, timeout=10)
        store = ServerStore(client, settings.qdrant_collection, replication_of(settings))
        await store.open()
        return store
    return await asyncio.to_thread(EdgeStore, settings.qdrant_path, settings.qdrant_collection)
