"""``python -m services.retriever.reindex``: re-embed every stored chunk with the current model.

Run after the embedding model was updated in place (same dimension), or on a
schedule as the spot-node batch job of ``deploy/k8s/components/spot-batch``.
Pages through the collection, embeds each page's chunk texts in one call and
writes the points back under their own ids, so a run that is interrupted (a
spot node taken back) can simply be started again: nothing is duplicated or
lost. A model with another dimension needs a new collection
(``RAG_QDRANT_COLLECTION``) filled through ``POST /v1/documents`` instead; the
run refuses to mix dimensions.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from services.common.http import ServiceClient
from services.common.logging import configure_logging, new_request_id
from services.retriever.config import Settings
from services.retriever.routes import embed
from services.retriever.store import VectorStore

log = structlog.get_logger("services.retriever.reindex")


async def reindex(store: VectorStore, embedding: ServiceClient, page_size: int) -> int:
    """Re-embeds every point; returns how many were rewritten."""
    done = 0
    offset: str | None = None
    run_id = new_request_id()
    started = time.perf_counter()
    while True:
        page, offset = await store.scroll(offset, page_size)
        if page:
            ids = [point_id for point_id, _ in page]
            payloads = [payload for _, payload in page]
            vectors, dimension = await embed(embedding, [str(p["text"]) for p in payloads], run_id)
            await store.ensure_collection(dimension)
            await store.upsert(ids, vectors, payloads)
            done += len(page)
            log.info("reindex_progress", points=done, seconds=round(time.perf_counter() - started, 1))
        if offset is None:
            return done


async def main(settings: Settings) -> int:
    store = await asyncio.to_thread(VectorStore, settings)
    embedding = ServiceClient("embedding", settings.embedding_url, settings.upstream_timeout_seconds)
    try:
        total = await reindex(store, embedding, settings.embed_batch_size)
    finally:
        await embedding.aclose()
        store.close()
    log.info("reindex_done", points=total, collection=settings.qdrant_collection)
    return 0


if __name__ == "__main__":
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json, "reindex")
    raise SystemExit(asyncio.run(main(settings)))
