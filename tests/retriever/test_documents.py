"""The retriever in-process on both store backends, with the real embedding model.

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
from tests.retriever.conftest import make_store


class EmbeddingDouble:
    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.down = False
        self.calls = 0
        self.texts: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.method == "GET":  # /readyz
            return httpx.Response(200, json={"status": "ok"})
        self.calls += 1
        texts = json.loads(request.content)["texts"]
        self.texts.extend(texts)
        vectors = self.embedder.encode(texts)
        return httpx.Response(
            200, json={"vectors": vectors, "model": "m", "dimension": len(vectors[0]), "device": "cpu"}
        )


@pytest.fixture
def embedding(embedder: Embedder) -> EmbeddingDouble:
    return EmbeddingDouble(embedder)


@pytest.fixture
def client(tmp_path: Path, embedding: EmbeddingDouble, backend: str) -> Iterator[TestClient]:
    settings = Settings(qdrant_path=str(tmp_path / "qdrant"), chunk_size=200, chunk_overlap=40)
    store = make_store(backend, tmp_path)
    app = create_app(settings, embedding_transport=httpx.MockTransport(embedding), store=store)
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
    assert client.get("/readyz").status_code == 200  # readiness never follows a dependency
    assert client.get("/v1/status").json()["checks"]["embedding"] == "embedding is unavailable"
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
        assert client.get("/readyz").status_code == 200  # readiness never follows a dependency
        assert client.get("/v1/status").json()["checks"]["qdrant"] == "qdrant is unavailable"


def test_headers_reach_what_is_embedded_but_not_the_returned_text(
    client: TestClient, embedding: EmbeddingDouble
) -> None:
    index(
        client,
        {"id": "notes/fruit.md", "text": "Bananas are yellow.", "metadata": {"title": "Fruit facts"}},
        {"id": "k8s.md", "text": "# Scheduling\n\nA DaemonSet runs one pod per node."},
        {"id": "plain", "text": "First line here.\nSecond line."},
    )
    assert "Fruit facts (notes/fruit.md)\n\nBananas are yellow." in embedding.texts
    assert any(t.startswith("Scheduling (k8s.md)\n\n# Scheduling") for t in embedding.texts)
    assert any(t.startswith("First line here. (plain)\n\n") for t in embedding.texts)
    hits = client.post("/v1/search", json={"query": "Which fruit is yellow?", "top_k": 3}).json()["hits"]
    assert hits[0]["document_id"] == "notes/fruit.md" and hits[0]["text"] == "Bananas are yellow."


def test_documents_are_listed_read_and_deleted(client: TestClient) -> None:
    docs = [
        {"id": f"team/doc-{i}.md", "text": LONG if i == 0 else f"Short note {i}.", "metadata": {"i": i}}
        for i in range(5)
    ]
    index(client, *docs)
    seen: dict[str, dict[str, object]] = {}
    cursor = None
    while True:
        params = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
        page = client.get("/v1/documents", params=params).json()
        assert len(page["documents"]) <= 2
        seen.update({d["id"]: d for d in page["documents"]})
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert set(seen) == {d["id"] for d in docs}
    assert seen["team/doc-3.md"] == {"id": "team/doc-3.md", "chunks": 1, "metadata": {"i": 3}}
    assert seen["team/doc-0.md"]["chunks"] == points(client) - 4

    quoted = client.get("/v1/documents/team%2Fdoc-3.md")  # a slash sent percent-encoded is the same id
    assert quoted.status_code == 200 and quoted.json()["id"] == "team/doc-3.md"
    one = client.get("/v1/documents/team/doc-0.md")
    assert one.status_code == 200 and one.json()["id"] == "team/doc-0.md" and one.json()["chunks"] > 1
    deleted = client.delete("/v1/documents/team/doc-0.md")
    assert deleted.status_code == 204 and deleted.content == b""
    assert points(client) == 4
    hits = client.post("/v1/search", json={"query": "retriever keeps chunk number in order", "top_k": 10}).json()
    assert all(h["document_id"] != "team/doc-0.md" for h in hits["hits"])
    for method in ("get", "delete"):
        missing = client.request(method.upper(), "/v1/documents/team/doc-0.md")
        assert missing.status_code == 404
        assert missing.json() == {"error": "not_found", "detail": "document 'team/doc-0.md' is not indexed"}


def test_the_list_comes_in_id_order_a_page_at_a_time(client: TestClient) -> None:
    ids = ["zeta", "alpha/2", "alpha/10", "Beta", "alpha", "été", "m" * 512]
    index(client, *({"id": doc, "text": f"Note {n}."} for n, doc in enumerate(ids)))
    listed: list[str] = []
    cursor = None
    while True:
        params = {"limit": 3} if cursor is None else {"limit": 3, "cursor": cursor}
        page = client.get("/v1/documents", params=params).json()
        listed.extend(d["id"] for d in page["documents"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert listed == sorted(ids)
    assert [d["id"] for d in client.get("/v1/documents").json()["documents"]] == sorted(ids)


def test_documents_are_deleted_in_bulk_by_prefix_or_metadata(client: TestClient) -> None:
    index(
        client,
        *({"id": f"docs/{i}.md", "text": f"Guide {i}.", "metadata": {"team": "web"}} for i in range(30)),
        {"id": "docs.md", "text": "Not under docs/.", "metadata": {"team": "web"}},
        {"id": "ops/runbook.md", "text": "Restart the pods.", "metadata": {"team": "ops", "draft": True}},
    )
    deleted = client.post("/v1/documents/delete", json={"prefix": "docs/"})
    assert deleted.status_code == 200 and deleted.json() == {"deleted": 30}
    assert [d["id"] for d in client.get("/v1/documents").json()["documents"]] == ["docs.md", "ops/runbook.md"]
    assert client.post("/v1/documents/delete", json={"prefix": "docs/"}).json() == {"deleted": 0}
    by_metadata = client.post("/v1/documents/delete", json={"filter": {"team": "ops", "draft": True}})
    assert by_metadata.json() == {"deleted": 1}
    assert points(client) == 1


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "prefix"),
        ({"prefix": None, "filter": None}, "prefix"),
        ({"prefix": ""}, "prefix"),
        ({"filter": {}}, "filter"),
        ({"filter": {"a.b": "x"}}, "filter"),
        ({"filter": {"n": 2**70}}, "filter"),
        ({"prefix": 3}, "prefix"),
    ],
)
def test_a_bulk_delete_that_selects_everything_or_nothing_valid_is_422(
    client: TestClient, payload: dict[str, object], field: str
) -> None:
    index(client, {"id": "kept", "text": "Still here."})
    response = client.post("/v1/documents/delete", json=payload)
    assert response.status_code == 422
    assert response.json()["error"] == "validation_error" and response.json()["detail"].startswith(field)
    assert points(client) == 1


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 5000}, "limit"),
        ({"cursor": "nope"}, "cursor"),
        ({"cursor": "0b5d2a7e-4f6c-5d2e-9a1b-3c4d5e6f7a8b"}, "cursor"),
        ({"cursor": "id:////"}, "cursor"),
    ],
)
def test_bad_list_parameters_are_422(client: TestClient, params: dict[str, object], field: str) -> None:
    response = client.get("/v1/documents", params=params)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(field)


def test_the_retriever_no_longer_serves_embed(client: TestClient) -> None:
    # Other services call the embedding service themselves (services.common.embedding).
    response = client.post("/v1/embed", json={"texts": ["one sentence"]})
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_dense_mode_is_a_setting(tmp_path: Path, embedding: EmbeddingDouble, backend: str) -> None:
    settings = Settings(search_mode="dense", search_fusion="dbsf")
    app = create_app(settings, embedding_transport=httpx.MockTransport(embedding), store=make_store(backend, tmp_path))
    with TestClient(app) as client:
        index(client, {"id": "a", "text": "Pods run on nodes.", "metadata": {"t": "x"}}, {"id": "b", "text": "Cats."})
        stats = client.get("/v1/stats").json()
        assert (stats["search_mode"], stats["search_fusion"]) == ("dense", "dbsf")
        hits = client.post("/v1/search", json={"query": "pods", "filters": {"t": "x"}}).json()["hits"]
        assert [h["document_id"] for h in hits] == ["a"]


def test_a_store_made_for_another_dimension_fails_every_request_naming_both(
    tmp_path: Path, embedding: EmbeddingDouble, backend: str
) -> None:
    store = make_store(backend, tmp_path)
    with TestClient(create_app(Settings(), store=store, embedding_transport=httpx.MockTransport(embedding))) as c:
        pass  # nothing seen yet: nothing fails
    store = make_store(backend, tmp_path / "other")
    import asyncio

    asyncio.run(store.ensure_collection(256))  # made for a model with 256 dimensions
    with TestClient(create_app(Settings(), store=store, embedding_transport=httpx.MockTransport(embedding))) as c:
        for response in (
            c.post("/v1/search", json={"query": "anything"}),
            c.get("/v1/documents"),
            c.post("/v1/documents", json={"documents": [{"id": "a", "text": "alpha"}]}),
        ):
            assert response.status_code == 503
            assert response.json()["error"] == "dimension_mismatch"
            assert "256" in response.json()["detail"] and "384" in response.json()["detail"]
        assert c.get("/readyz").status_code == 200
        assert "256" in c.get("/v1/status").json()["checks"]["retriever"]
