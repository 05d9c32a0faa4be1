"""The Qdrant server backend, through qdrant-client's async client.

A cluster's collections are created replicated (``RAG_QDRANT_REPLICATION_FACTOR``
copies of each of ``RAG_QDRANT_SHARDS`` shards, a write acknowledged by
``RAG_QDRANT_WRITE_CONSISTENCY`` of them). The same class runs over
qdrant-client's local mode in tests, which takes the same calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import structlog
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from services.common.errors import UpstreamUnavailable
from services.common.schemas import FilterValue, Source
from services.common.tenants import DEFAULT_TENANT
from services.retriever.store.base import (
    DENSE,
    ID_PAGE,
    RRF_K,
    SPARSE,
    TENANT,
    ChunkPoint,
    DocumentInfo,
    Fusion,
    SearchMode,
    document_info,
    fused_top,
    hybrid_fetch_limit,
    hybrid_prefetch_limit,
    mismatch,
    page_after,
    to_source,
)
from services.retriever.text import Sparse

log = structlog.get_logger(__name__)
T = TypeVar("T")
_DOC_FIELDS = ["document_id", "chunks", "metadata"]
TENANT_INDEX = models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True)
"""Qdrant's advice for multitenancy: a keyword index on the tenant field, marked ``is_tenant`` so the server
keeps each tenant's points together on disk and plans a tenant's search within them."""


@dataclass(frozen=True, slots=True)
class Replication:
    replication_factor: int = 2
    shards: int = 3
    write_consistency: int = 1


class ServerStore:
    location = "server"

    def __init__(self, client: AsyncQdrantClient, collection: str, replication: Replication | None = None) -> None:
        self.collection = collection
        self._client = client
        self._replication = replication or Replication()
        self._dimension: int | None = None
        self._exists = False
        self._lock = asyncio.Lock()

    @property
    def dimension(self) -> int | None:
        return self._dimension

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except (
            ResponseHandlingException,
            UnexpectedResponse,
            httpx.TransportError,
            ConnectionError,
            TimeoutError,
        ) as exc:
            log.warning("qdrant_unavailable", error=str(exc)[:200])
            raise UpstreamUnavailable("qdrant is unavailable") from exc

    async def ping(self) -> None:
        await self._call(self._client.get_collections())

    async def open(self) -> None:
        """Reads the stored dimension when the collection exists; a server that is down is no error here."""
        try:
            await self._load()
        except UpstreamUnavailable:
            log.warning("qdrant_unavailable_at_start", collection=self.collection)

    async def _load(self) -> bool:
        if not await self._call(self._client.collection_exists(self.collection)):
            return False
        info = await self._call(self._client.get_collection(self.collection))
        vectors = info.config.params.vectors
        params = vectors.get(DENSE) if isinstance(vectors, dict) else None
        if params is None:
            raise UpstreamUnavailable(
                f"collection {self.collection!r} has no {DENSE!r} vector: it was made by an older version; "
                "point RAG_QDRANT_COLLECTION at a new collection and index the documents again"
            )
        self._dimension = int(params.size)
        if TENANT not in (info.payload_schema or {}):  # a collection made before tenants existed
            await self._call(self._client.create_payload_index(self.collection, TENANT, TENANT_INDEX))
        self._exists = True
        return True

    async def ensure_collection(self, dimension: int) -> None:
        if self._dimension is None:
            async with self._lock:
                if self._dimension is None and not await self._load():
                    await self._create(dimension)
        if self._dimension is not None and self._dimension != dimension:
            raise mismatch(self.collection, self._dimension, dimension)

    async def _create(self, dimension: int) -> None:
        rep = self._replication
        try:
            await self._call(
                self._client.create_collection(
                    self.collection,
                    vectors_config={DENSE: models.VectorParams(size=dimension, distance=models.Distance.COSINE)},
                    sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
                    shard_number=rep.shards,
                    replication_factor=rep.replication_factor,
                    write_consistency_factor=rep.write_consistency,
                )
            )
        except UpstreamUnavailable:
            if await self._load():  # another replica created it first
                return
            raise
        fields: tuple[tuple[str, models.PayloadSchemaType | models.KeywordIndexParams], ...] = (
            (TENANT, TENANT_INDEX),
            ("document_id", models.PayloadSchemaType.KEYWORD),
            ("chunk", models.PayloadSchemaType.INTEGER),
        )
        for field, schema in fields:
            await self._call(self._client.create_payload_index(self.collection, field, schema))
        self._dimension = dimension
        self._exists = True
        log.info(
            "collection_created", backend="server", collection=self.collection, dimension=dimension, **vars_of(rep)
        )

    async def _has_collection(self) -> bool:
        if not self._exists:
            await self._load()
        return self._exists

    async def write(
        self, points: Sequence[ChunkPoint], chunk_counts: dict[str, int], tenant: str = DEFAULT_TENANT
    ) -> None:
        # One request holding the upsert and the delete of a shorter re-send's old tail: no crash of this
        # process can fall between them and leave a document of two versions. The server applies the two in
        # order; what a reader on the server sees between them, or a crash of the server itself in between,
        # this does not cover (the embedded store does: EdgeStore.write).
        operations: list[models.UpdateOperation] = []
        if points:
            structs = [
                models.PointStruct(id=p.id, vector={DENSE: p.dense, SPARSE: _sparse(p.sparse)}, payload=p.payload)
                for p in points
            ]
            operations.append(models.UpsertOperation(upsert=models.PointsList(points=structs)))
        if chunk_counts:
            selector = models.FilterSelector(filter=_stale_filter(chunk_counts, tenant))
            operations.append(models.DeleteOperation(delete=selector))
        if operations:
            await self._call(self._client.batch_update_points(self.collection, operations, wait=True))

    async def search(
        self,
        dense: list[float],
        sparse: Sparse | None,
        top_k: int,
        filters: dict[str, FilterValue] | None,
        mode: SearchMode,
        fusion: Fusion = "rrf",
        tenant: str = DEFAULT_TENANT,
    ) -> list[Source]:
        if not await self._has_collection():
            return []
        flt = _search_filter(filters, tenant)
        if mode == "hybrid" and sparse is not None and sparse.indices:
            limit = hybrid_prefetch_limit(top_k)
            response = await self._call(
                self._client.query_points(
                    self.collection,
                    prefetch=[
                        models.Prefetch(query=dense, using=DENSE, limit=limit, filter=flt),
                        models.Prefetch(query=_sparse(sparse), using=SPARSE, limit=limit, filter=flt),
                    ],
                    query=(
                        models.FusionQuery(fusion=models.Fusion.DBSF)
                        if fusion == "dbsf"
                        else models.RrfQuery(rrf=models.Rrf(k=RRF_K))
                    ),
                    query_filter=flt,
                    limit=hybrid_fetch_limit(top_k),
                    with_payload=True,
                    with_vectors=[DENSE],
                )
            )
            points = response.points
            points, scores = fused_top(dense, points, top_k)
        else:
            response = await self._call(
                self._client.query_points(
                    self.collection, query=dense, using=DENSE, query_filter=flt, limit=top_k, with_payload=True
                )
            )
            points = response.points
            scores = [p.score for p in points]
        return [to_source(dict(p.payload), s) for p, s in zip(points, scores, strict=True) if p.payload is not None]

    async def scroll(self, offset: str | None, limit: int) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
        if not await self._has_collection():
            return [], None
        records, next_offset = await self._call(
            self._client.scroll(self.collection, limit=limit, offset=offset, with_payload=True, with_vectors=False)
        )
        page = [(str(r.id), dict(r.payload or {})) for r in records]
        return page, None if next_offset is None else str(next_offset)

    async def list_documents(
        self, limit: int, after: str | None, tenant: str = DEFAULT_TENANT
    ) -> tuple[list[DocumentInfo], str | None]:
        if not await self._has_collection():
            return [], None
        ids, next_after = page_after(await self._document_ids(None, None, tenant), after, limit)
        if not ids:
            return [], None
        records, _ = await self._call(
            self._client.scroll(
                self.collection,
                scroll_filter=models.Filter(
                    must=[
                        _of_tenant(tenant),
                        _match("chunk", 0),
                        models.FieldCondition(key="document_id", match=models.MatchAny(any=ids)),
                    ]
                ),
                limit=len(ids),
                with_payload=_DOC_FIELDS,
                with_vectors=False,
            )
        )
        found = {info.id: info for info in (document_info(dict(r.payload or {})) for r in records)}
        return [found[i] for i in ids if i in found], next_after

    async def _document_ids(self, prefix: str | None, filters: dict[str, FilterValue] | None, tenant: str) -> list[str]:
        """The sorted ids of the tenant's documents under ``prefix`` whose metadata holds ``filters``."""
        must: list[models.Condition] = [_of_tenant(tenant), _match("chunk", 0)]
        if prefix is not None:
            # Prefix matching on keyword fields needs Qdrant 1.19 or newer.
            must.append(models.FieldCondition(key="document_id", match=models.MatchPrefix(prefix=prefix)))
        must.extend(_match(f"metadata.{key}", value) for key, value in (filters or {}).items())
        ids: list[str] = []
        offset: models.ExtendedPointId | None = None
        while True:
            records, offset = await self._call(
                self._client.scroll(
                    self.collection,
                    scroll_filter=models.Filter(must=must),
                    limit=ID_PAGE,
                    offset=offset,
                    with_payload=["document_id"],
                    with_vectors=False,
                )
            )
            ids.extend(str((r.payload or {})["document_id"]) for r in records)
            if offset is None:
                return sorted(ids)

    async def get_document(self, document_id: str, tenant: str = DEFAULT_TENANT) -> DocumentInfo | None:
        if not await self._has_collection():
            return None
        records, _ = await self._call(
            self._client.scroll(
                self.collection,
                scroll_filter=models.Filter(
                    must=[_of_tenant(tenant), _match("document_id", document_id), _match("chunk", 0)]
                ),
                limit=1,
                with_payload=_DOC_FIELDS,
                with_vectors=False,
            )
        )
        return document_info(dict(records[0].payload or {})) if records else None

    async def delete_document(self, document_id: str, tenant: str = DEFAULT_TENANT) -> bool:
        if not await self._has_collection():
            return False
        flt = models.Filter(must=[_of_tenant(tenant), _match("document_id", document_id)])
        found = await self._call(self._client.count(self.collection, count_filter=flt, exact=True))
        if found.count == 0:
            return False
        await self._call(
            self._client.delete(self.collection, points_selector=models.FilterSelector(filter=flt), wait=True)
        )
        return True

    async def delete_documents(
        self, prefix: str | None, filters: dict[str, FilterValue] | None, tenant: str = DEFAULT_TENANT
    ) -> int:
        if not await self._has_collection():
            return 0
        ids = await self._document_ids(prefix, filters, tenant)
        for start in range(0, len(ids), ID_PAGE):
            flt = models.Filter(
                must=[
                    _of_tenant(tenant),
                    models.FieldCondition(key="document_id", match=models.MatchAny(any=ids[start : start + ID_PAGE])),
                ]
            )
            await self._call(
                self._client.delete(self.collection, points_selector=models.FilterSelector(filter=flt), wait=True)
            )
        return len(ids)

    async def count(self) -> int:
        if not await self._has_collection():
            return 0
        return int((await self._call(self._client.count(self.collection, exact=True))).count)

    async def close(self) -> None:
        await self._client.close()


def vars_of(rep: Replication) -> dict[str, int]:
    return {
        "replication_factor": rep.replication_factor,
        "shards": rep.shards,
        "write_consistency": rep.write_consistency,
    }


def _sparse(sparse: Sparse) -> models.SparseVector:
    return models.SparseVector(indices=sparse.indices, values=sparse.values)


def _match(key: str, value: FilterValue) -> models.FieldCondition:
    return models.FieldCondition(key=key, match=models.MatchValue(value=value))


def _of_tenant(tenant: str) -> models.Filter:
    """The tenant's chunks; the default tenant's include those stored before tenants existed (no field)."""
    if tenant == DEFAULT_TENANT:
        return models.Filter(
            should=[_match(TENANT, tenant), models.IsEmptyCondition(is_empty=models.PayloadField(key=TENANT))]
        )
    return models.Filter(must=[_match(TENANT, tenant)])


def _search_filter(filters: dict[str, FilterValue] | None, tenant: str) -> models.Filter:
    must: list[models.Condition] = [_of_tenant(tenant)]
    must.extend(_match(f"metadata.{key}", value) for key, value in (filters or {}).items())
    return models.Filter(must=must)


def _stale_filter(chunk_counts: dict[str, int], tenant: str) -> models.Filter:
    return models.Filter(
        must=[_of_tenant(tenant)],
        should=[
            models.Filter(
                must=[_match("document_id", doc), models.FieldCondition(key="chunk", range=models.Range(gte=n))]
            )
            for doc, n in chunk_counts.items()
        ],
    )
