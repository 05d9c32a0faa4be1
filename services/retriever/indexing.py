"""Documents into the store: chunk, head, embed in full batches, write in batches, stages overlapped.

Chunks of all documents in a request are embedded together in full batches
(``RAG_EMBED_BATCH_SIZE``), with up to ``RAG_EMBED_CONCURRENCY`` calls in
flight so the embedding service always has the next batch waiting. A
document is written as soon as all of its chunks have vectors, while the
next batches are still being embedded. Every write is an upsert under
deterministic ids followed by removal of the chunks an earlier, longer
version left behind: sending the same documents again changes nothing, and
a request that fails half-way is finished by sending it again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import structlog

from services.common.embedding import EmbeddingClient
from services.common.schemas import Document
from services.common.tenants import DEFAULT_TENANT
from services.retriever.chunking import chunk_text, point_id
from services.retriever.metrics import CHUNKS_INDEXED, DOCUMENTS_INDEXED
from services.retriever.store import ChunkPoint, DimensionMismatch, VectorStore
from services.retriever.store.base import TENANT, mismatch
from services.retriever.text import KeywordEncoder, document_title, header, indexed_text

log = structlog.get_logger(__name__)
WRITE_BATCH = 256


class DimensionCheck:
    """Remembers a store made for another model: from the first time both sizes are seen, every request fails."""

    def __init__(self, store: VectorStore) -> None:
        self.store = store
        self.error: DimensionMismatch | None = None

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def compare(self, dimension: int) -> None:
        """Checks the model's size against the stored one, when the store already has one."""
        self.raise_if_failed()
        stored = self.store.dimension
        if stored is not None and stored != dimension:
            self._fail(mismatch(self.store.collection, stored, dimension))

    async def seen(self, dimension: int) -> None:
        """Like ``compare``, creating the collection for this size when there is none yet."""
        self.raise_if_failed()
        try:
            await self.store.ensure_collection(dimension)
        except DimensionMismatch as exc:
            self._fail(exc)

    def _fail(self, exc: DimensionMismatch) -> NoReturn:
        self.error = exc
        log.error("store_dimension_mismatch", collection=self.store.collection, detail=exc.detail)
        raise exc


@dataclass(frozen=True, slots=True)
class _Chunk:
    doc: int
    index: int
    text: str
    indexed: str


def plan(documents: Sequence[Document], chunk_size: int, overlap: int) -> tuple[list[_Chunk], list[int], list[str]]:
    """Every chunk of every document in order, each document's chunk count, and its title."""
    chunks: list[_Chunk] = []
    counts: list[int] = []
    titles: list[str] = []
    for n, doc in enumerate(documents):
        title = document_title(doc.id, doc.text, doc.metadata)
        head = header(doc.id, title)
        pieces = chunk_text(doc.text, chunk_size, overlap)
        chunks.extend(_Chunk(n, i, piece, indexed_text(head, piece)) for i, piece in enumerate(pieces))
        counts.append(len(pieces))
        titles.append(title)
    return chunks, counts, titles


async def index_documents(
    documents: Sequence[Document],
    *,
    store: VectorStore,
    embedding: EmbeddingClient,
    encoder: KeywordEncoder,
    dimensions: DimensionCheck,
    chunk_size: int,
    overlap: int,
    batch_size: int,
    concurrency: int,
    request_id: str = "",
    tenant: str = DEFAULT_TENANT,
) -> int:
    """Indexes the documents as ``tenant``'s; returns how many chunks were written."""
    chunks, counts, titles = plan(documents, chunk_size, overlap)
    batches = [chunks[i : i + batch_size] for i in range(0, len(chunks), batch_size)]
    slots = asyncio.Semaphore(concurrency)

    async def embed(batch: list[_Chunk]) -> list[list[float]]:
        async with slots:
            embedded = await embedding.embed([c.indexed for c in batch], request_id)
        await dimensions.seen(embedded.dimension)
        return embedded.vectors

    tasks = [asyncio.create_task(embed(batch)) for batch in batches]
    pending: list[ChunkPoint] = []
    pending_counts: dict[str, int] = {}
    written = 0
    try:
        for batch, task in zip(batches, tasks, strict=True):
            vectors = await task
            for chunk, vector in zip(batch, vectors, strict=True):
                doc = documents[chunk.doc]
                payload = {
                    TENANT: tenant,
                    "document_id": doc.id,
                    "chunk": chunk.index,
                    "chunks": counts[chunk.doc],
                    "title": titles[chunk.doc],
                    "text": chunk.text,
                    "metadata": doc.metadata,
                }
                pending.append(
                    ChunkPoint(point_id(doc.id, chunk.index, tenant), vector, encoder.document(chunk.indexed), payload)
                )
                if chunk.index == counts[chunk.doc] - 1:
                    pending_counts[doc.id] = counts[chunk.doc]
            # Write whole documents only: a failure later leaves each document old or new, never mixed.
            if len(pending) >= WRITE_BATCH and pending_counts:
                cut = _last_complete(pending, pending_counts)
                await store.write(pending[:cut], pending_counts, tenant)
                written += cut
                pending, pending_counts = pending[cut:], {}
        # Documents without any chunk cannot reach this point (the request rejects blank text).
        if pending or pending_counts:
            await store.write(pending, pending_counts, tenant)
            written += len(pending)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    DOCUMENTS_INDEXED.inc(len(documents))
    CHUNKS_INDEXED.inc(written)
    log.info("documents_indexed", documents=len(documents), chunks=written, batches=len(batches))
    return written


def _last_complete(pending: list[ChunkPoint], complete: dict[str, int]) -> int:
    """Length of the prefix of ``pending`` that holds only complete documents."""
    cut = len(pending)
    while cut and str(pending[cut - 1].payload["document_id"]) not in complete:
        cut -= 1
    return cut
