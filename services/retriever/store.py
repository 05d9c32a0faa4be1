"""The vector store: Qdrant through qdrant-client, a server or local mode on a path."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from services.common.errors import UpstreamUnavailable
from services.common.schemas import FilterValue, Source
from services.retriever.config import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")


class VectorStore:
    """Async facade over the blocking client; every Qdrant failure becomes a 503 naming Qdrant."""

    def __init__(self, settings: Settings) -> None:
        self.collection = settings.qdrant_collection
        self.local = not settings.qdrant_url
        if self.local:
            Path(settings.qdrant_path).mkdir(parents=True, exist_ok=True)
            self._client = QdrantClient(path=settings.qdrant_path)
        else:
            self._client = QdrantClient(url=settings.qdrant_url, api_key=settings.qdrant_api_key or None, timeout=10)
        # Local mode is one SQLite file and numpy arrays: one call at a time.
        self._lock = threading.Lock()
        self._dimension: int | None = None

    @property
    def location(self) -> str:
        return "local" if self.local else "server"

    def _locked(self, fn: Callable[[], T]) -> T:
        with self._lock:
            return fn()

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            if self.local:
                return await asyncio.to_thread(self._locked, fn)
            return await asyncio.to_thread(fn)
        except (ResponseHandlingException, UnexpectedResponse, ConnectionError, TimeoutError) as exc:
            log.warning("qdrant_unavailable", error=str(exc)[:200])
            raise UpstreamUnavailable("qdrant is unavailable") from exc

    async def ping(self) -> None:
        await self._call(self._client.get_collections)

    async def ensure_collection(self, dimension: int) -> None:
        if self._dimension == dimension:
            return

        def ensure() -> None:
            if not self._client.collection_exists(self.collection):
                self._client.create_collection(
                    self.collection,
                    vectors_config=models.VectorParams(size=dimension, distance=models.Distance.COSINE),
                )
                if not self.local:  # payload indexes make the filters fast on a server
                    self._client.create_payload_index(self.collection, "document_id", models.PayloadSchemaType.KEYWORD)
                    self._client.create_payload_index(self.collection, "chunk", models.PayloadSchemaType.INTEGER)
                return
            info = self._client.get_collection(self.collection)
            params = info.config.params.vectors
            size = params.size if isinstance(params, models.VectorParams) else None
            if size is not None and size != dimension:
                raise RuntimeError(
                    f"collection {self.collection!r} holds {size}-dimensional vectors, the model makes {dimension}"
                )

        await self._call(ensure)
        self._dimension = dimension

    async def replace_document(
        self, document_id: str, ids: list[str], vectors: list[list[float]], payloads: list[dict[str, Any]]
    ) -> None:
        """Upserts a document's chunks, then removes chunks a longer earlier version left beyond them.

        Upsert first, delete after: a failure in between leaves the old tail,
        never a hole, and a retry finishes the job.
        """
        points = _points(ids, vectors, payloads)

        def write() -> None:
            self._client.upsert(self.collection, points=points, wait=True)
            stale = models.Filter(
                must=[
                    models.FieldCondition(key="document_id", match=models.MatchValue(value=document_id)),
                    models.FieldCondition(key="chunk", range=models.Range(gte=len(points))),
                ]
            )
            self._client.delete(self.collection, points_selector=models.FilterSelector(filter=stale), wait=True)

        await self._call(write)

    async def search(self, vector: list[float], top_k: int, filters: dict[str, FilterValue] | None) -> list[Source]:
        query_filter = None
        if filters:
            query_filter = models.Filter(
                must=[
                    models.FieldCondition(key=f"metadata.{key}", match=models.MatchValue(value=value))
                    for key, value in filters.items()
                ]
            )

        def search() -> list[models.ScoredPoint]:
            if not self._client.collection_exists(self.collection):
                return []
            return self._client.query_points(
                self.collection, query=vector, limit=top_k, query_filter=query_filter, with_payload=True
            ).points

        points = await self._call(search)
        return [
            Source(
                document_id=str(p.payload["document_id"]),
                chunk=int(p.payload["chunk"]),
                score=float(p.score),
                text=str(p.payload["text"]),
                metadata=dict(p.payload.get("metadata") or {}),
            )
            for p in points
            if p.payload is not None
        ]

    async def scroll(self, offset: str | None, limit: int) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
        """One page of stored points (id, payload), in id order, and the offset of the next page."""

        def scroll() -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
            if not self._client.collection_exists(self.collection):
                return [], None
            records, next_offset = self._client.scroll(
                self.collection, limit=limit, offset=offset, with_payload=True, with_vectors=False
            )
            page = [(str(r.id), dict(r.payload or {})) for r in records]
            return page, None if next_offset is None else str(next_offset)

        return await self._call(scroll)

    async def upsert(self, ids: list[str], vectors: list[list[float]], payloads: list[dict[str, Any]]) -> None:
        points = _points(ids, vectors, payloads)
        await self._call(lambda: self._client.upsert(self.collection, points=points, wait=True))

    async def count(self) -> int:
        def count() -> int:
            if not self._client.collection_exists(self.collection):
                return 0
            return int(self._client.count(self.collection, exact=True).count)

        return await self._call(count)

    def close(self) -> None:
        self._client.close()


def _points(ids: list[str], vectors: list[list[float]], payloads: list[dict[str, Any]]) -> list[models.PointStruct]:
    return [models.PointStruct(id=i, vector=v, payload=p) for i, v, p in zip(ids, vectors, payloads, strict=True)]
