"""Re-indexing rewrites every stored chunk with fresh vectors, under the same ids, without duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from services.common.errors import RagError
from services.common.http import ServiceClient
from services.embedding.model import Embedder
from services.retriever.app import create_app
from services.retriever.config import Settings
from services.retriever.reindex import reindex
from services.retriever.store import VectorStore


def embedding_transport(embedder: Embedder, scale: float, seen: list[int]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        texts = json.loads(request.content)["texts"]
        seen.append(len(texts))
        vectors = [[x * scale for x in v] for v in embedder.encode(texts)]
        return httpx.Response(200, json={"vectors": vectors, "model": "m", "dimension": 384, "device": "cpu"})

    return httpx.MockTransport(handle)


async def test_reindex_rewrites_every_point_in_pages(tmp_path: Path, embedder: Embedder) -> None:
    settings = Settings(qdrant_path=str(tmp_path / "q"), chunk_size=100, chunk_overlap=20)
    docs = [{"id": f"d{i}", "text": f"Document {i} talks about topic {i}. " * 8} for i in range(5)]
    with TestClient(create_app(settings, embedding_transport=embedding_transport(embedder, 1.0, []))) as client:
        written = client.post("/v1/documents", json={"documents": docs}).json()["chunks"]
        before = client.post("/v1/search", json={"query": "topic 3", "top_k": 3}).json()["hits"]
    assert written > 5

    store = VectorStore(settings)
    calls: list[int] = []
    # Negated vectors: a search afterwards tells whether the stored vectors really changed.
    client = ServiceClient("embedding", "http://e", 5, transport=embedding_transport(embedder, -1.0, calls))
    try:
        assert await reindex(store, client, page_size=4) == written
        assert await store.count() == written
        assert sum(calls) == written and max(calls) <= 4
        query = embedder.encode(["topic 3"])[0]
        after = await store.search(query, 3, None)
    finally:
        await client.aclose()
        store.close()
    assert {(h.document_id, h.chunk, h.text) for h in after} != {
        (h["document_id"], h["chunk"], h["text"]) for h in before
    }
    assert all(h.score < 0 for h in after)  # every vector now points the other way


async def test_reindex_of_an_empty_store_does_nothing(tmp_path: Path, embedder: Embedder) -> None:
    store = VectorStore(Settings(qdrant_path=str(tmp_path / "q")))
    client = ServiceClient("embedding", "http://e", 5, transport=embedding_transport(embedder, 1.0, []))
    try:
        assert await reindex(store, client, page_size=8) == 0
    finally:
        await client.aclose()
        store.close()


async def test_reindex_with_embedding_down_fails_clearly_and_keeps_the_data(tmp_path: Path, embedder: Embedder) -> None:
    settings = Settings(qdrant_path=str(tmp_path / "q"))
    with TestClient(create_app(settings, embedding_transport=embedding_transport(embedder, 1.0, []))) as client:
        client.post("/v1/documents", json={"documents": [{"id": "a", "text": "alpha"}]})

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    store = VectorStore(settings)
    client = ServiceClient("embedding", "http://e", 5, transport=httpx.MockTransport(down))
    try:
        with pytest.raises(RagError, match="embedding is unavailable"):
            await reindex(store, client, page_size=8)
        assert await store.count() == 1
    finally:
        await client.aclose()
        store.close()
