"""The retriever in-process: real Qdrant local mode on a temporary path, the real embedding model.

The embedding service is reached through an ``httpx.MockTransport`` that runs
the real model, so the retriever's HTTP contract with it is exercised; a switch
turns it into an outage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from services.embedding.model import Embedder
from services.retriever.app import create_app
from services.retriever.config import Settings


class EmbeddingDouble:
    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.down = False
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.method == "GET":  # /readyz
            return httpx.Response(200, json={"status": "ok"})
        self.calls += 1
        texts = json.loads(request.content)["texts"]
        vectors = self.embedder.encode(texts)
        return httpx.Response(
            200, json={"vectors": vectors, "model": "m", "dimension": len(vectors[0]), "device": "cpu"}
        )


@pytest.fixture
def embedding(embedder: Embedder) -> EmbeddingDouble:
    return EmbeddingDouble(embedder)


@pytest.fixture
def client(tmp_path: Path, embedding: EmbeddingDouble) -> Iterator[TestClient]:
    settings = Settings(qdrant_path=str(tmp_path / "qdrant"), chunk_size=200, chunk_overlap=40)
    app = create_app(settings, embedding_transport=httpx.MockTransport(embedding))
    with TestClient(app) as client:
        yield client


LONG = " ".join(f"Paragraph {i} explains how the retriever keeps chunk number {i} in order." for i in range(12))


def points(client: TestClient) -> int:
    return int(client.get("/v1/stats").json()["points"])


def index(client: TestClient, *docs: dict[str, object]) -> httpx.Response:
    return client.post("/v1/documents", json={"documents": list(docs)})


def test_index_then_search_finds_the_document(client: TestClient) -> None:
    response = index(
        client,
        {"id": "fruit", "text": "Bananas are yellow and rich in potassium.", "metadata": {"lang": "en"}},
        {"id": "k8s", "text": "A DaemonSet runs one pod on every node of the cluster."},
    )
    assert response.json() == {"indexed": 2, "chunks": 2}
    hits = client.post("/v1/search", json={"query": "Which fruit is yellow?", "top_k": 2}).json()
    assert hits["hits"][0]["document_id"] == "fruit"
    assert hits["hits"][0]["metadata"] == {"lang": "en"}
    assert hits["hits"][0]["score"] > hits["hits"][1]["score"]
    assert hits["embed_ms"] > 0 and hits["search_ms"] > 0


def test_sending_a_document_again_changes_nothing(client: TestClient) -> None:
    first = index(client, {"id": "long", "text": LONG}).json()
    assert first["chunks"] > 3
    assert points(client) == first["chunks"]
    again = index(client, {"id": "long", "text": LONG}).json()
    assert again == first
    assert points(client) == first["chunks"]


def test_a_shorter_version_replaces_the_longer_one_without_leftovers(client: TestClient) -> None:
    index(client, {"id": "long", "text": LONG})
    index(client, {"id": "other", "text": "Unrelated text that must survive."})
    assert index(client, {"id": "long", "text": "Now it is one short chunk."}).json()["chunks"] == 1
    assert points(client) == 2
    hits = client.post("/v1/search", json={"query": "chunk order", "top_k": 10}).json()["hits"]
    texts = {(h["document_id"], h["text"]) for h in hits}
    assert texts == {("long", "Now it is one short chunk."), ("other", "Unrelated text that must survive.")}


def test_filters_match_metadata(client: TestClient) -> None:
    index(
        client,
        {"id": "a", "text": "Pods are scheduled onto nodes.", "metadata": {"team": "infra"}},
        {"id": "b", "text": "Pods are scheduled onto nodes too.", "metadata": {"team": "apps"}},
    )
    hits = client.post("/v1/search", json={"query": "pods", "top_k": 5, "filters": {"team": "apps"}}).json()["hits"]
    assert [h["document_id"] for h in hits] == ["b"]


def test_search_on_an_empty_store_returns_no_hits(client: TestClient) -> None:
    assert client.post("/v1/search", json={"query": "anything"}).json()["hits"] == []


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"documents": []}, "documents"),
        ({"documents": [{"id": "x", "text": ""}]}, "documents.0.text"),
        ({"documents": [{"id": "x", "text": "  \n"}]}, "documents.0.text"),
        ({"documents": [{"id": "", "text": "t"}]}, "documents.0.id"),
        ({"documents": [{"id": "x", "text": 5}]}, "documents.0.text"),
        ({"documents": [{"id": "x", "text": "t"}, {"id": "x", "text": "u"}]}, "documents"),
        ({}, "documents"),
    ],
)
def test_bad_documents_are_422_and_write_nothing(
    client: TestClient, embedding: EmbeddingDouble, payload: dict[str, object], field: str
) -> None:
    index(client, {"id": "keep", "text": "Already indexed."})
    calls = embedding.calls
    response = client.post("/v1/documents", json=payload)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(field)
    assert embedding.calls == calls
    assert points(client) == 1


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"query": " "}, "query"),
        ({"query": "q", "top_k": 0}, "top_k"),
        ({"query": "q", "filters": {"a": [1]}}, "filters"),
    ],
)
def test_bad_searches_are_422(client: TestClient, payload: dict[str, object], field: str) -> None:
    response = client.post("/v1/search", json=payload)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(field)


def test_embedding_down_is_503_naming_it_and_loses_nothing(client: TestClient, embedding: EmbeddingDouble) -> None:
    index(client, {"id": "keep", "text": "Already indexed."})
    embedding.down = True
    response = index(client, {"id": "keep", "text": "A new version that cannot be embedded now."})
    assert response.status_code == 503
    assert response.json() == {"error": "upstream_unavailable", "detail": "embedding is unavailable"}
    search = client.post("/v1/search", json={"query": "q"})
    assert search.status_code == 503
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["qdrant"] == "ok"
    embedding.down = False  # it comes back: the same retry now succeeds
    hits = client.post("/v1/search", json={"query": "indexed", "top_k": 1}).json()["hits"]
    assert hits[0]["text"] == "Already indexed."
    assert index(client, {"id": "keep", "text": "A new version."}).json() == {"indexed": 1, "chunks": 1}


def test_qdrant_server_down_is_503_naming_it(embedding: EmbeddingDouble) -> None:
    from ragpod.processes import free_port

    settings = Settings(qdrant_url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with TestClient(create_app(settings, embedding_transport=httpx.MockTransport(embedding))) as client:
        search = client.post("/v1/search", json={"query": "anything"})
        assert search.status_code == 503
        assert search.json() == {"error": "upstream_unavailable", "detail": "qdrant is unavailable"}
        indexed = index(client, {"id": "a", "text": "alpha"})
        assert indexed.status_code == 503 and indexed.json()["detail"] == "qdrant is unavailable"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["qdrant"] == "qdrant is unavailable"
