"""``python -m services.retriever.reindex``: re-embed every stored chunk with the current model.

Run after the embedding model was updated in place (same dimension), or on a
schedule as the spot-node batch job of ``deploy/k8s/components/spot-batch``.
Pages through the collection, embeds each page's chunks (with their document
header, as at indexing) in one call and writes the points back under their
own ids, so a run that is interrupted (a spot node taken back) can simply be
started again: nothing is duplicated or lost. A model with another dimension
needs a new collection (``RAG_QDRANT_COLLECTION``) filled through
``POST /v1/documents`` instead; the run refuses to mix dimensions.

It needs an embedding client and a store, nothing of the HTTP routes.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from services.common.embedding import EmbeddingClient
from services.common.logging import configure_logging, new_request_id
from services.retriever.config import Settings
from services.retriever.store import ChunkPoint, VectorStore, open_store
from services.retriever.text import KeywordEncoder, header, indexed_text

log = structlog.get_logger("services.retriever.reindex")


async def reindex(store: VectorStore, embedding: EmbeddingClient, encoder: KeywordEncoder, page_size: int) -> int:
    """Re-embeds every point; returns how many were rewritten."""
    done = 0
    offset: str | None = None
    run_id = new_request_id()
    started = time.perf_counter()
    while True:
        page, offset = await store.scroll(offset, page_size)
        if page:
            texts = [
                indexed_text(header(str(p["document_id"]), str(p.get("title") or p["document_id"])), str(p["text"]))
                for _, p in page
            ]
            embedded = await embedding.embed(texts, run_id)
            await store.ensure_collection(embedded.dimension)
            points = [
                ChunkPoint(point_id, vector, encoder.document(text), payload)
                for (point_id, payload), vector, text in zip(page, embedded.vectors, texts, strict=True)
            ]
            await store.write(points, {})
            done += len(page)
            log.info("reindex_progress", points=done, seconds=round(time.perf_counter() - started, 1))
        if offset is None:
            return done


async def main(settings: Settings) -> int:
    store = await open_store(settings)
    embedding = EmbeddingClient.from_settings(settings, settings.upstream_timeout_seconds)
    try:
        total = await reindex(store, embedding, KeywordEncoder(settings.chunk_size), settings.embed_batch_size)
    finally:
        await embedding.aclose()
        await store.close()
    log.info("reindex_done", points=total, collection=settings.qdrant_collection)
    return 0


if __name__ == "__main__":
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json, "reindex")
    raise SystemExit(asyncio.run(main(settings)))
