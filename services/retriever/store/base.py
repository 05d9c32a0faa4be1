"""The store interface both backends implement, and what they share."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

from services.common.errors import DimensionMismatch
from services.common.schemas import FilterValue, Source
from services.common.tenants import DEFAULT_TENANT
from services.retriever.text import Sparse

SearchMode = Literal["hybrid", "dense"]
Fusion = Literal["rrf", "dbsf"]
"""How hybrid search merges its dense and keyword candidates, inside Qdrant's Query API.

rrf: reciprocal rank fusion, places only; dbsf: distribution-based score fusion (each list's scores
scaled by its own mean and three standard deviations, then summed), so how far ahead a candidate is
counts, not only its place."""
DENSE = "dense"
SPARSE = "bm25"
RRF_K = 2
"""Qdrant's own default for reciprocal-rank fusion, set explicitly so both backends fuse alike."""
TENANT = "tenant"
"""The payload field naming a chunk's tenant. A chunk without it was stored before tenants existed and is the
default tenant's: the default tenant's filter is "tenant is default, or empty"."""
ID_PAGE = 10_000
"""Document ids read per scroll call while collecting them (listing in id order, bulk delete)."""


class LegacyStore(RuntimeError):
    """The configured path holds a store this version does not read."""


@dataclass(frozen=True, slots=True)
class ChunkPoint:
    """One chunk as stored: deterministic id, dense and keyword vectors, payload."""

    id: str
    dense: list[float]
    sparse: Sparse
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DocumentInfo:
    id: str
    chunks: int
    metadata: dict[str, Any] = field(default_factory=dict)


class VectorStore(Protocol):
    """Chunks of documents with a dense and a keyword vector each.

    ``write`` upserts first, then deletes the chunks a longer earlier version
    left beyond each document's new chunk count: a failure in between leaves
    an old tail, never a hole, and a retry finishes the job. The embedded
    store goes further: no read runs between the two, and a crash between
    them is finished when it opens next, so readers see one version whole.

    Every operation but ``scroll`` and ``count`` is one tenant's: it reads,
    replaces or deletes only chunks whose ``tenant`` field names it (for the
    default tenant, also chunks without the field, stored before tenants).
    """

    collection: str
    location: str

    @property
    def dimension(self) -> int | None:
        """Size of the stored dense vectors, None while the collection does not exist."""
        ...

    async def ping(self) -> None: ...

    async def ensure_collection(self, dimension: int) -> None:
        """Creates the collection, or raises DimensionMismatch naming both sizes."""
        ...

    async def write(
        self, points: Sequence[ChunkPoint], chunk_counts: dict[str, int], tenant: str = DEFAULT_TENANT
    ) -> None:
        """``chunk_counts``: the documents of ``tenant`` written whole, whose chunks past the count go."""
        ...

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
        """Best chunks of ``tenant`` first; ``score`` is the dense cosine similarity in every mode."""
        ...

    async def scroll(self, offset: str | None, limit: int) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
        """One page of stored points (id, payload) of every tenant in id order, and the offset of the next page
        (for re-indexing, which writes each point back with its own payload, tenant included)."""
        ...

    async def list_documents(
        self, limit: int, after: str | None, tenant: str = DEFAULT_TENANT
    ) -> tuple[list[DocumentInfo], str | None]:
        """Up to ``limit`` documents in id order, from the first id after ``after``, and the id to pass as
        ``after`` for the next page (None on the last page).

        Qdrant orders points by point id (a hash here) and cannot order by a keyword field, so every page
        reads the ids of all documents (chunk 0 of each, its ``document_id`` only) and sorts them: a page
        costs time in proportion to the documents stored, and a document written between two pages is
        listed when its id sorts after the cursor."""
        ...

    async def get_document(self, document_id: str, tenant: str = DEFAULT_TENANT) -> DocumentInfo | None: ...

    async def delete_document(self, document_id: str, tenant: str = DEFAULT_TENANT) -> bool:
        """Removes every chunk of the tenant's document; False when it had none."""
        ...

    async def delete_documents(
        self, prefix: str | None, filters: dict[str, FilterValue] | None, tenant: str = DEFAULT_TENANT
    ) -> int:
        """Removes every document whose id starts with ``prefix`` and whose metadata holds ``filters`` (both
        when both are given); returns how many documents were removed. The caller refuses an empty selector."""
        ...

    async def count(self) -> int: ...

    async def close(self) -> None: ...


def mismatch(collection: str, stored: int, model: int) -> DimensionMismatch:
    return DimensionMismatch(stored, model, collection=collection)


def hybrid_prefetch_limit(top_k: int) -> int:
    """Candidates each of the two searches hands to rank fusion."""
    return max(4 * top_k, 40)


def hybrid_fetch_limit(top_k: int) -> int:
    """Fused hits asked of Qdrant: more than ``top_k``, so that a tie at the cut is settled by ``fused_top``."""
    return 2 * top_k


def cosine_scores(query: Sequence[float], vectors: Sequence[Sequence[float] | None]) -> list[float]:
    """Cosine similarity of the query with each stored vector (0 where a vector is missing)."""
    if not vectors:
        return []
    q = np.asarray(query, dtype=np.float32)
    dim = len(q)
    m = np.asarray([v if v is not None else [0.0] * dim for v in vectors], dtype=np.float32)
    norms = np.linalg.norm(m, axis=1) * (float(np.linalg.norm(q)) or 1.0)
    norms[norms == 0] = 1.0
    return [float(x) for x in (m @ q) / norms]


class _Fused(Protocol):
    @property
    def id(self) -> Any: ...

    @property
    def score(self) -> float: ...


F = TypeVar("F", bound=_Fused)


def by_fused_score(points: Sequence[F], cosines: Sequence[float], top_k: int) -> tuple[list[F], list[float]]:
    """The best ``top_k`` in fused order, ties settled the same way every time: closer vector, then point id.

    Rank fusion gives equal scores to, say, first-in-dense-third-in-keyword and
    third-in-dense-first-in-keyword; Qdrant then keeps the order in which the
    points happen to be stored, which depends on which write finished first.
    The caller asks Qdrant for more than ``top_k`` (``hybrid_fetch_limit``) so
    that a tie at the cut is settled here too.
    """
    # Rounded: 1/3 + 1/7 and 1/7 + 1/3 may differ in the last bit of a float.
    order = sorted(range(len(points)), key=lambda i: (-round(points[i].score, 6), -cosines[i], str(points[i].id)))[
        :top_k
    ]
    return [points[i] for i in order], [cosines[i] for i in order]


def fused_top(query: Sequence[float], points: Sequence[Any], top_k: int) -> tuple[list[Any], list[float]]:
    """Fused hits (with their dense vectors) -> the best ``top_k`` and each one's cosine to the query."""
    return by_fused_score(points, cosine_scores(query, [dense_of(p.vector) for p in points]), top_k)


def dense_of(vector: Any) -> list[float] | None:
    """The dense vector out of a point's named vectors, as both backends return them."""
    if isinstance(vector, dict):
        value = vector.get(DENSE)
        return value if isinstance(value, list) else None
    return None


def to_source(payload: dict[str, Any], score: float) -> Source:
    return Source(
        document_id=str(payload["document_id"]),
        chunk=int(payload["chunk"]),
        score=float(score),
        text=str(payload["text"]),
        metadata=dict(payload.get("metadata") or {}),
    )


def page_after(ids: Sequence[str], after: str | None, limit: int) -> tuple[list[str], str | None]:
    """The page of sorted ``ids`` that follows ``after``, and the cursor of the next page (None at the end)."""
    start = 0 if after is None else bisect.bisect_right(ids, after)
    page = list(ids[start : start + limit])
    return page, page[-1] if page and start + limit < len(ids) else None


def document_info(payload: dict[str, Any]) -> DocumentInfo:
    return DocumentInfo(
        id=str(payload["document_id"]),
        chunks=int(payload.get("chunks", 0)),
        metadata=dict(payload.get("metadata") or {}),
    )
