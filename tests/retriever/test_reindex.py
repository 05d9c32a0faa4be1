"""Re-indexing rewrites every stored chunk with fresh vectors, under the same ids, without duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from services.common.embedding import EmbeddingClient
from services.common.errors import RagError
from services.common.http import ServiceClient
from services.embedding.model import Embedder
from services.retriever.app import create_app
from services.retriever.config import Settings
from services.retriever.reindex import reindex
from services.retriever.store import VectorStore
from services.retriever.text import KeywordEncoder

ENCODER = KeywordEncoder(100)


def embedding_transport(embedder: Embedder, scale: float, seen: list[list[str]]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        texts = json.loads(request.content)["texts"]
        seen.append(texts)
        vectors = [[x * scale for x in v] for v in embedder.encode(texts)]
        return httpx.Response(200, json={"vectors": vectors, "model": "m", "dimension": 384, "device": "cpu"})

    return httpx.MockTransport(handle)


def client_of(transport: httpx.MockTransport) -> EmbeddingClient:
    return EmbeddingClient(ServiceClient("embedding", "http://e", 5, transport=transport))


def fill(store: VectorStore, embedder: Embedder, seen: list[list[str]]) -> tuple[int, list[str]]:
    settings = Settings(chunk_size=100, chunk_overlap=20)
    docs = [{"id": f"d{i}", "text": f"Document {i} talks about topic {i}. " * 8} for i in range(5)]
    app = create_app(settings, embedding_transport=embedding_transport(embedder, 1.0, seen), store=store)
    with TestClient(app) as client:
        written = client.post("/v1/documents", json={"documents": docs}).json()["chunks"]
    return written, [t for batch in seen for t in batch if t != "dimension check"]


async def test_reindex_rewrites_every_point_in_pages(store: VectorStore, embedder: Embedder) -> None:
    written, indexed_texts = fill(store, embedder, [])
    assert written > 5
    calls: list[list[str]] = []
    # Negated vectors: a search afterwards tells whether the stored vectors really changed.
    client = client_of(embedding_transport(embedder, -1.0, calls))
    try:
        assert await reindex(store, client, ENCODER, page_size=4) == written
        assert await store.count() == written
        assert sum(map(len, calls)) == written and max(map(len, calls)) <= 4
        # The same texts as at indexing: header and chunk.
        assert sorted(t for batch in calls for t in batch) == sorted(indexed_texts)
        query = embedder.encode(["topic 3"])[0]
        after = await store.search(query, None, 3, None, "dense")
    finally:
        await client.aclose()
    assert all(h.score < 0 for h in after)  # every vector now points the other way
    hybrid = await store.search(query, ENCODER.query("topic 3"), 3, None, "hybrid")
    assert len(hybrid) == 3 and all(h.score < 0 for h in hybrid)  # keyword vectors were written back too


async def test_reindex_of_an_empty_store_does_nothing(store: VectorStore, embedder: Embedder) -> None:
    client = client_of(embedding_transport(embedder, 1.0, []))
    try:
        assert await reindex(store, client, ENCODER, page_size=8) == 0
    finally:
        await client.aclose()


async def test_reindex_with_embedding_down_fails_clearly_and_keeps_the_data(
    store: VectorStore, embedder: Embedder
) -> None:
    written, _ = fill(store, embedder, [])

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = client_of(httpx.MockTransport(down))
    try:
        with pytest.raises(RagError, match="embedding is unavailable"):
            await reindex(store, client, ENCODER, page_size=8)
        assert await store.count() == written
    finally:
        await client.aclose()


def test_reindex_needs_no_http_routes() -> None:
    import services.retriever.reindex as module

    source = Path(module.__file__).read_text()
    assert "services.retriever.routes" not in source and "services.retriever.app" not in source
