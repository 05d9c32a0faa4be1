"""The embedded store: Qdrant Edge, Qdrant's own engine inside the process.

Segments, a write-ahead log, HNSW for dense vectors, an inverted index for
sparse ones and payload indexes, in one directory per collection under
``RAG_QDRANT_PATH``. One process at a time may open a directory.

Qdrant Edge builds its HNSW index only when asked (``optimize``), and holds
Python's interpreter lock while it does, so the whole process waits for it.
The store therefore asks at moments it chooses: when it opens (before the
service answers) and after every ``index_after`` points written, so a search
scans at most that many points that are not in the index yet. Qdrant's
optimizer only builds segments past its indexing threshold, so most of these
calls return at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import qdrant_edge as qe
import structlog

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
    LegacyStore,
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
CONFIG_FILE = "edge_config.json"
TENANT_INDEX = qe.KeywordIndexParams(is_tenant=True)
"""The tenant field's index, marked ``is_tenant`` as on a Qdrant server (Qdrant Edge records the flag in its
payload schema; the filter on the field is what keeps tenants apart, on both backends)."""
PENDING_SUFFIX = "pending-writes"  # notes of writes under way (see ``EdgeStore.write``)


def check_not_legacy(root: Path) -> None:
    """qdrant-client's local mode left ``meta.json`` and ``collection/<name>/storage.sqlite`` here."""
    if (root / "meta.json").exists() or (root / "collection").is_dir():
        raise LegacyStore(
            f"RAG_QDRANT_PATH={root} holds a store written by qdrant-client's local mode, which the embedded "
            f"Qdrant Edge store does not read. Move that directory away (or delete it), start again, and index "
            f"the documents again: `ragpod ingest <files or folders>` or POST /v1/documents. "
            f"Or set RAG_QDRANT_PATH to a new directory."
        )


class EdgeStore:
    location = "embedded"

    def __init__(
        self,
        root: str | Path,
        collection: str,
        index_after: int | None = 20_000,
        indexing_threshold_kb: int | None = None,
    ) -> None:
        """``indexing_threshold_kb``: segment size from which Qdrant builds HNSW (None: Qdrant's default)."""
        self.collection = collection
        self._threshold_kb = indexing_threshold_kb
        self._index_after = index_after
        self._unindexed = 0
        self._root = Path(root)
        check_not_legacy(self._root)
        self._path = self._root / collection
        self._pending = self._root / f"{collection}.{PENDING_SUFFIX}"  # beside the shard's own directory
        self._shard: qe.EdgeShard | None = None
        self._dimension: int | None = None
        self._create_lock = asyncio.Lock()
        self._whole = threading.Lock()  # held by a write's two updates and by every read
        self._flush_lock = asyncio.Lock()
        self._applied = 0  # updates applied to the shard, counted as each returns
        self._durable = 0  # of those, how many a finished flush is known to cover
        config = self._path / CONFIG_FILE
        if config.exists():
            stored = json.loads(config.read_text())
            self._dimension = int(stored["vectors"][DENSE]["size"])
            self._shard = qe.EdgeShard.load(str(self._path))
            if TENANT not in self._shard.info().payload_schema:  # a store written before tenants existed
                self._shard.update(qe.UpdateOperation.create_field_index(TENANT, TENANT_INDEX))
            _finish_interrupted_writes(self._shard, self._pending)
            started = time.perf_counter()
            self._shard.optimize()
            log.info(
                "store_opened",
                backend="edge",
                path=str(self._path),
                dimension=self._dimension,
                points=self._shard.info().points_count,
                index_seconds=round(time.perf_counter() - started, 2),
            )

    @property
    def dimension(self) -> int | None:
        return self._dimension

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(fn)

    async def _read(self, fn: Callable[[], T]) -> T:
        """A read of the shard, never between the two updates of one write (see ``write``)."""

        def read() -> T:
            with self._whole:
                return fn()

        return await asyncio.to_thread(read)

    async def ping(self) -> None:
        return None

    async def ensure_collection(self, dimension: int) -> None:
        if self._dimension is not None:
            if self._dimension != dimension:
                raise mismatch(self.collection, self._dimension, dimension)
            return
        async with self._create_lock:
            if self._shard is None:
                self._shard = await self._run(lambda: _create(self._path, dimension, self._threshold_kb))
                self._dimension = dimension
                log.info("collection_created", backend="edge", path=str(self._path), dimension=dimension)

    async def write(
        self, points: Sequence[ChunkPoint], chunk_counts: dict[str, int], tenant: str = DEFAULT_TENANT
    ) -> None:
        shard = self._shard
        if shard is None:
            raise RuntimeError("ensure_collection must run before write")
        edge_points = [qe.Point(p.id, {DENSE: p.dense, SPARSE: _sparse(p.sparse)}, p.payload) for p in points]

        def write() -> Path | None:
            # Qdrant Edge has no update of two operations, so a re-sent shorter document takes two: the upsert
            # (one write-ahead-log record: all of it or none after a crash) and the delete of the old tail.
            # Readers wait while both run; a crash between them is finished when the store opens next,
            # from the note written (and synced) before the first.
            note = _note_write(self._pending, chunk_counts, tenant) if chunk_counts else None
            with self._whole:
                if edge_points:
                    shard.update(qe.UpdateOperation.upsert_points(edge_points))
                if chunk_counts:
                    shard.update(qe.UpdateOperation.delete_points_by_filter(_stale_filter(chunk_counts, tenant)))
            return note

        note = await self._run(write)
        self._applied += 1
        await self._flush_through(self._applied)
        if note is not None:
            note.unlink(missing_ok=True)  # on disk now: nothing to finish after a crash
        self._unindexed += len(edge_points)
        if self._index_after is not None and self._unindexed >= self._index_after:
            await self.optimize()

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
        shard = self._shard
        if shard is None:
            return []
        flt = _search_filter(filters, tenant)
        if mode == "hybrid" and sparse is not None and sparse.indices:
            limit = hybrid_prefetch_limit(top_k)
            request = qe.QueryRequest(
                limit=hybrid_fetch_limit(top_k),
                prefetches=[
                    qe.Prefetch(limit=limit, query=qe.Query.Nearest(dense, using=DENSE), filter=flt),
                    qe.Prefetch(limit=limit, query=qe.Query.Nearest(_sparse(sparse), using=SPARSE), filter=flt),
                ],
                # The stubs omit the nested classes.
                query=cast(Any, qe.Fusion.Dbsf() if fusion == "dbsf" else qe.Fusion.Rrf(k=RRF_K)),
                filter=flt,
                with_payload=True,
                with_vector=[DENSE],
            )
            points = await self._read(lambda: shard.query(request))
            points, scores = fused_top(dense, points, top_k)
        else:
            request = qe.QueryRequest(
                limit=top_k, query=qe.Query.Nearest(dense, using=DENSE), filter=flt, with_payload=True
            )
            points = await self._read(lambda: shard.query(request))
            scores = [p.score for p in points]
        return [to_source(dict(p.payload), s) for p, s in zip(points, scores, strict=True) if p.payload is not None]

    async def scroll(self, offset: str | None, limit: int) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
        shard = self._shard
        if shard is None:
            return [], None
        request = qe.ScrollRequest(offset=_point_id(offset), limit=limit, with_payload=True, with_vector=False)
        records, next_offset = await self._read(lambda: shard.scroll(request))
        page = [(str(r.id), dict(r.payload or {})) for r in records]
        return page, None if next_offset is None else str(next_offset)

    async def list_documents(
        self, limit: int, after: str | None, tenant: str = DEFAULT_TENANT
    ) -> tuple[list[DocumentInfo], str | None]:
        shard = self._shard
        if shard is None:
            return [], None
        ids, next_after = page_after(await self._document_ids(None, None, tenant), after, limit)
        if not ids:
            return [], None
        request = qe.ScrollRequest(
            limit=len(ids),
            filter=qe.Filter(
                must=[
                    _of_tenant(tenant),
                    _match("chunk", 0),
                    qe.FieldCondition(key="document_id", match=qe.MatchAny(ids)),
                ]
            ),
            with_payload=_DOC_FIELDS,
            with_vector=False,
        )
        records, _ = await self._read(lambda: shard.scroll(request))
        found = {info.id: info for info in (document_info(dict(r.payload or {})) for r in records)}
        return [found[i] for i in ids if i in found], next_after

    async def _document_ids(self, prefix: str | None, filters: dict[str, FilterValue] | None, tenant: str) -> list[str]:
        """The sorted ids of the tenant's documents under ``prefix`` whose metadata holds ``filters``."""
        shard = self._shard
        if shard is None:
            return []
        must: list[qe.ConditionType] = [_of_tenant(tenant), _match("chunk", 0)]
        if prefix is not None:
            must.append(qe.FieldCondition(key="document_id", match=qe.MatchPrefix(prefix)))
        # qdrant-edge-py passes a Python bool on as the integer 1 or 0, which never matches a stored
        # true or false: boolean fields are compared here, on the metadata read back.
        flags = {key: value for key, value in (filters or {}).items() if isinstance(value, bool)}
        must.extend(_match(f"metadata.{key}", value) for key, value in (filters or {}).items() if key not in flags)

        def selected(payload: dict[str, Any]) -> bool:
            metadata = payload.get("metadata") or {}
            return all(isinstance(metadata.get(key), bool) and metadata[key] == value for key, value in flags.items())

        def collect() -> list[str]:
            ids: list[str] = []
            offset: qe.PointId | None = None
            while True:
                request = qe.ScrollRequest(
                    offset=offset,
                    limit=ID_PAGE,
                    filter=qe.Filter(must=must),
                    with_payload=["document_id", "metadata"] if flags else ["document_id"],
                    with_vector=False,
                )
                records, offset = shard.scroll(request)
                payloads = [dict(r.payload or {}) for r in records]
                ids.extend(str(payload["document_id"]) for payload in payloads if selected(payload))
                if offset is None:
                    return sorted(ids)

        return await self._read(collect)

    async def get_document(self, document_id: str, tenant: str = DEFAULT_TENANT) -> DocumentInfo | None:
        shard = self._shard
        if shard is None:
            return None
        request = qe.ScrollRequest(
            limit=1,
            filter=qe.Filter(must=[_of_tenant(tenant), _match("document_id", document_id), _match("chunk", 0)]),
            with_payload=_DOC_FIELDS,
            with_vector=False,
        )
        records, _ = await self._read(lambda: shard.scroll(request))
        return document_info(dict(records[0].payload or {})) if records else None

    async def delete_document(self, document_id: str, tenant: str = DEFAULT_TENANT) -> bool:
        shard = self._shard
        if shard is None:
            return False
        flt = qe.Filter(must=[_of_tenant(tenant), _match("document_id", document_id)])

        def delete() -> bool:
            if shard.count(qe.CountRequest(exact=True, filter=flt)) == 0:
                return False
            shard.update(qe.UpdateOperation.delete_points_by_filter(flt))
            return True

        deleted = await self._run(delete)
        if deleted:
            self._applied += 1
            await self._flush_through(self._applied)
        return deleted

    async def delete_documents(
        self, prefix: str | None, filters: dict[str, FilterValue] | None, tenant: str = DEFAULT_TENANT
    ) -> int:
        shard = self._shard
        ids = await self._document_ids(prefix, filters, tenant)
        if shard is None or not ids:
            return 0

        def delete() -> None:
            with self._whole:  # readers see all of the selection or none of it
                for start in range(0, len(ids), ID_PAGE):
                    batch = ids[start : start + ID_PAGE]
                    flt = qe.Filter(
                        must=[_of_tenant(tenant), qe.FieldCondition(key="document_id", match=qe.MatchAny(batch))]
                    )
                    shard.update(qe.UpdateOperation.delete_points_by_filter(flt))

        await self._run(delete)
        self._applied += 1
        await self._flush_through(self._applied)
        return len(ids)

    async def _flush_through(self, update: int) -> None:
        """Returns once update number ``update`` is on disk: the shard's write-ahead log and segments
        flushed (msync and fsync), so a write is acknowledged only once a power cut cannot undo it.

        Group commit: a flush covers every update applied before it began, so concurrent writes that
        arrive while one flush runs share the next one instead of flushing one by one."""
        shard = self._shard
        async with self._flush_lock:
            if shard is None or self._durable >= update:
                return
            covers = self._applied
            await self._run(shard.flush)
            self._durable = covers

    async def count(self) -> int:
        shard = self._shard
        if shard is None:
            return 0
        return await self._read(lambda: shard.count(qe.CountRequest(exact=True)))

    async def optimize(self) -> None:
        """Builds the HNSW index over what was written since the last time (the process waits meanwhile)."""
        shard = self._shard
        if shard is None:
            return
        started = time.perf_counter()
        optimized = await self._run(shard.optimize)
        self._unindexed = 0
        if optimized:
            info = shard.info()
            log.info(
                "store_indexed",
                points=info.points_count,
                indexed_vectors=info.indexed_vectors_count,
                seconds=round(time.perf_counter() - started, 2),
            )

    async def close(self) -> None:
        shard, self._shard = self._shard, None
        if shard is not None:
            await self._run(shard.flush)
            await self._run(shard.close)


def _note_write(pending: Path, chunk_counts: dict[str, int], tenant: str) -> Path:
    """Writes down, durably, the documents a write is about to replace, before it touches the shard."""
    pending.mkdir(parents=True, exist_ok=True)
    note = pending / f"{uuid.uuid4().hex}.json"
    with open(note, "w") as out:
        json.dump({"tenant": tenant, "documents": sorted(chunk_counts)}, out)
        out.flush()
        os.fsync(out.fileno())
    directory = os.open(pending, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return note


def _finish_interrupted_writes(shard: qe.EdgeShard, pending: Path) -> None:
    """Finishes the writes a crash interrupted between their upsert and their delete.

    A document's chunk 0 states its chunk count (``chunks``) as of the last upsert that reached the
    write-ahead log: that upsert is there whole or not at all. Chunks at or beyond that count are an
    older version's tail and are deleted; when the upsert never landed, the count is the old version's own
    and nothing is deleted. Either way each document is left as one version, whole."""
    notes = sorted(pending.glob("*.json")) if pending.is_dir() else []
    if not notes:
        return
    documents: dict[str, set[str]] = {}
    for note in notes:
        with contextlib.suppress(ValueError):  # a note cut short by the crash: its write never began
            written = json.loads(note.read_text() or "[]")
            if isinstance(written, list):  # a note of a version before tenants: the default tenant's
                written = {"tenant": DEFAULT_TENANT, "documents": written}
            documents.setdefault(str(written["tenant"]), set()).update(str(doc) for doc in written["documents"])
    finished = 0
    for tenant, ids in sorted(documents.items()):
        counts = {}
        for doc in sorted(ids):
            request = qe.ScrollRequest(
                limit=1,
                filter=qe.Filter(must=[_of_tenant(tenant), _match("document_id", doc), _match("chunk", 0)]),
                with_payload=["chunks"],
                with_vector=False,
            )
            records, _ = shard.scroll(request)
            counts[doc] = int((records[0].payload or {}).get("chunks", 0)) if records else 0
        if counts:
            shard.update(qe.UpdateOperation.delete_points_by_filter(_stale_filter(counts, tenant)))
            finished += len(counts)
    if finished:
        shard.flush()
    for note in notes:
        note.unlink()
    log.warning("store_interrupted_writes_finished", writes=len(notes), documents=finished)


def _create(path: Path, dimension: int, threshold_kb: int | None) -> qe.EdgeShard:
    config = qe.EdgeConfig(
        vectors={DENSE: qe.EdgeVectorParams(size=dimension, distance=qe.Distance.Cosine)},
        sparse_vectors={SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
        optimizers=None if threshold_kb is None else qe.EdgeOptimizersConfig(indexing_threshold=threshold_kb),
    )
    shard = qe.EdgeShard.create(str(path), config)
    shard.update(qe.UpdateOperation.create_field_index(TENANT, TENANT_INDEX))
    shard.update(qe.UpdateOperation.create_field_index("document_id", qe.PayloadSchemaType.Keyword))
    shard.update(qe.UpdateOperation.create_field_index("chunk", qe.PayloadSchemaType.Integer))
    return shard


def _sparse(sparse: Sparse) -> qe.SparseVector:
    return qe.SparseVector(indices=sparse.indices, values=sparse.values)


def _point_id(value: str | None) -> uuid.UUID | None:
    return None if value is None else uuid.UUID(value)


def _match(key: str, value: FilterValue) -> qe.FieldCondition:
    return qe.FieldCondition(key=key, match=qe.MatchValue(value))


def _of_tenant(tenant: str) -> qe.Filter:
    """The tenant's chunks; the default tenant's include those stored before tenants existed (no field)."""
    if tenant == DEFAULT_TENANT:
        return qe.Filter(should=[_match(TENANT, tenant), qe.IsEmptyCondition(TENANT)])
    return qe.Filter(must=[_match(TENANT, tenant)])


def _search_filter(filters: dict[str, FilterValue] | None, tenant: str) -> qe.Filter:
    must: list[qe.ConditionType] = [_of_tenant(tenant)]
    must.extend(_match(f"metadata.{key}", value) for key, value in (filters or {}).items())
    return qe.Filter(must=must)


def _stale_filter(chunk_counts: dict[str, int], tenant: str) -> qe.Filter:
    """The tenant's chunks at or beyond each document's new chunk count."""
    return qe.Filter(
        must=[_of_tenant(tenant)],
        should=[
            qe.Filter(must=[_match("document_id", doc), qe.FieldCondition(key="chunk", range=qe.RangeFloat(gte=count))])
            for doc, count in chunk_counts.items()
        ],
    )
