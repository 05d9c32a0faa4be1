"""Tenants in the store, on both backends: every operation reads or changes one tenant's chunks only, the same
document id in two tenants is two documents, and chunks stored before tenants existed are the default tenant's
under the ids they already have."""

from __future__ import annotations

from pathlib import Path

import pytest
import qdrant_edge as qe
from fastapi.testclient import TestClient

from services.common.tenants import DEFAULT_TENANT
from services.embedding.model import Embedder
from services.retriever.app import create_app
from services.retriever.chunking import point_id
from services.retriever.config import Settings
from services.retriever.reindex import reindex
from services.retriever.store import ChunkPoint, EdgeStore, VectorStore
from services.retriever.store.base import TENANT
from services.retriever.text import KeywordEncoder, header, indexed_text
from tests.retriever.conftest import make_store
from tests.retriever.test_reindex import client_of, embedding_transport

ENCODER = KeywordEncoder(800)
A, B = "team-a", "team-b"
SECRET = "The salaries of team B are secret: Alice earns 99000 euros."


async def put(
    store: VectorStore, embedder: Embedder, docs: dict[str, list[str]], tenant: str | None
) -> list[ChunkPoint]:
    """Writes the documents as ``tenant``'s, as the indexer does; ``None``: as a store before tenants did
    (no tenant field, the ids of then)."""
    points = []
    for doc_id, chunks in docs.items():
        texts = [indexed_text(header(doc_id, doc_id), chunk) for chunk in chunks]
        for i, (chunk, text, vector) in enumerate(zip(chunks, texts, embedder.encode(texts), strict=True)):
            payload = {"document_id": doc_id, "chunk": i, "chunks": len(chunks), "title": doc_id, "text": chunk}
            payload["metadata"] = {"team": tenant or "legacy"}
            if tenant is not None:
                payload[TENANT] = tenant
            ids = point_id(doc_id, i) if tenant is None else point_id(doc_id, i, tenant)
            points.append(ChunkPoint(ids, vector, ENCODER.document(text), payload))
    await store.ensure_collection(embedder.dimension)
    counts = {doc_id: len(chunks) for doc_id, chunks in docs.items()}
    if tenant is None:
        await store.write(points, counts)
    else:
        await store.write(points, counts, tenant)
    return points


async def two_tenants(store: VectorStore, embedder: Embedder) -> None:
    await put(store, embedder, {"shared.md": ["Team A's shared notes: lunch is at noon."], "a/only.md": ["A."]}, A)
    await put(store, embedder, {"shared.md": ["Team B's notes."], "b/secret-salaries.md": [SECRET]}, B)


async def search(store: VectorStore, embedder: Embedder, question: str, tenant: str, mode: str = "hybrid") -> set[str]:
    vector = embedder.encode([question])[0]
    hits = await store.search(vector, ENCODER.query(question), 10, None, mode, "rrf", tenant)  # type: ignore[arg-type]
    return {f"{hit.document_id}: {hit.text}" for hit in hits}


@pytest.mark.parametrize("mode", ["hybrid", "dense"])
async def test_a_search_finds_only_the_tenant_s_chunks(store: VectorStore, embedder: Embedder, mode: str) -> None:
    await two_tenants(store, embedder)
    found_by_a = await search(store, embedder, "What are the salaries of team B?", A, mode)
    assert found_by_a == {"shared.md: Team A's shared notes: lunch is at noon.", "a/only.md: A."}
    found_by_b = await search(store, embedder, "What are the salaries of team B?", B, mode)
    assert f"b/secret-salaries.md: {SECRET}" in found_by_b and len(found_by_b) == 2
    assert await search(store, embedder, "salaries", "team-c", mode) == set()


async def test_listing_and_reading_see_only_the_tenant_s_documents(store: VectorStore, embedder: Embedder) -> None:
    await two_tenants(store, embedder)
    listed_a, _ = await store.list_documents(10, None, A)
    assert [(d.id, d.metadata) for d in listed_a] == [("a/only.md", {"team": A}), ("shared.md", {"team": A})]
    listed_b, _ = await store.list_documents(10, None, B)
    assert [d.id for d in listed_b] == ["b/secret-salaries.md", "shared.md"]
    assert await store.get_document("b/secret-salaries.md", A) is None
    assert (await store.get_document("shared.md", A)).metadata == {"team": A}  # type: ignore[union-attr]
    assert (await store.get_document("shared.md", B)).metadata == {"team": B}  # type: ignore[union-attr]
    assert await store.list_documents(10, None, DEFAULT_TENANT) == ([], None)


async def test_a_delete_reaches_only_the_tenant_s_document(store: VectorStore, embedder: Embedder) -> None:
    await two_tenants(store, embedder)
    assert await store.delete_document("b/secret-salaries.md", A) is False
    assert await store.delete_documents("b/", None, A) == 0
    assert await store.delete_documents(None, {"team": B}, A) == 0
    assert await store.delete_document("shared.md", A) is True
    assert await store.get_document("shared.md", B) is not None
    assert await store.delete_documents("", None, B) == 2  # every document of B ...
    assert [d.id for d in (await store.list_documents(10, None, A))[0]] == ["a/only.md"]  # ... and none of A
    assert await store.count() == 1


async def test_a_shorter_resend_removes_its_own_tenant_s_old_tail_only(store: VectorStore, embedder: Embedder) -> None:
    await put(store, embedder, {"shared.md": ["one", "two", "three"]}, A)
    await put(store, embedder, {"shared.md": ["uno", "dos", "tres"]}, B)
    await put(store, embedder, {"shared.md": ["one again"]}, A)
    assert await store.count() == 1 + 3
    assert (await store.get_document("shared.md", B)).chunks == 3  # type: ignore[union-attr]
    assert await search(store, embedder, "tres", B, "dense") == {"shared.md: uno", "shared.md: dos", "shared.md: tres"}


async def test_chunks_stored_before_tenants_are_the_default_tenant_s_and_keep_their_ids(
    store: VectorStore, embedder: Embedder
) -> None:
    old = await put(store, embedder, {"handbook.md": ["Vacation is 27 days.", "Sick leave is paid."]}, None)
    await put(store, embedder, {"handbook.md": ["Team A's handbook."]}, A)
    assert [d.id for d in (await store.list_documents(10, None, DEFAULT_TENANT))[0]] == ["handbook.md"]
    assert await search(store, embedder, "vacation", A, "dense") == {"handbook.md: Team A's handbook."}
    assert "handbook.md: Vacation is 27 days." in await search(store, embedder, "vacation", DEFAULT_TENANT, "dense")
    # Sent again as the default tenant's: the same ids, so the old chunks are replaced, never duplicated.
    again = await put(store, embedder, {"handbook.md": ["Vacation is 30 days.", "Sick leave is paid."]}, DEFAULT_TENANT)
    assert [p.id for p in again] == [p.id for p in old]
    assert await store.count() == 2 + 1
    assert await search(store, embedder, "vacation", DEFAULT_TENANT, "dense") == {
        "handbook.md: Vacation is 30 days.",
        "handbook.md: Sick leave is paid.",
    }
    assert await store.delete_document("handbook.md", A) is True
    assert (await store.get_document("handbook.md", DEFAULT_TENANT)).chunks == 2  # type: ignore[union-attr]


async def test_reindexing_keeps_every_chunk_with_its_tenant_and_id(
    store: VectorStore, embedder: Embedder, tmp_path: Path
) -> None:
    await two_tenants(store, embedder)
    await put(store, embedder, {"old.md": ["Stored before tenants."]}, None)
    before = {point_id: payload.get(TENANT) for point_id, payload in (await store.scroll(None, 100))[0]}
    client = client_of(embedding_transport(embedder, -1.0, []))
    try:
        assert await reindex(store, client, ENCODER, page_size=2) == len(before)
    finally:
        await client.aclose()
    after = {point_id: payload.get(TENANT) for point_id, payload in (await store.scroll(None, 100))[0]}
    assert after == before
    assert await search(store, embedder, "salaries", A, "dense") == {
        "shared.md: Team A's shared notes: lunch is at noon.",
        "a/only.md: A.",
    }
    assert [d.id for d in (await store.list_documents(10, None, DEFAULT_TENANT))[0]] == ["old.md"]


def test_the_retriever_routes_act_for_the_tenant_in_the_header(store: VectorStore, embedder: Embedder) -> None:
    settings = Settings(chunk_size=100, chunk_overlap=20)
    app = create_app(settings, embedding_transport=embedding_transport(embedder, 1.0, []), store=store)
    doc = {"documents": [{"id": "shared.md", "text": "The same id, another tenant's text."}]}
    with TestClient(app) as client:
        for tenant in (A, B):
            assert client.post("/v1/documents", json=doc, headers={"X-Ragpod-Tenant": tenant}).status_code == 200
        assert client.post("/v1/documents", json=doc).status_code == 200  # no header: the default tenant
        listed = client.get("/v1/documents", headers={"X-Ragpod-Tenant": A}).json()["documents"]
        assert [d["id"] for d in listed] == ["shared.md"]
        assert client.delete("/v1/documents/shared.md", headers={"X-Ragpod-Tenant": A}).status_code == 204
        assert client.get("/v1/documents/shared.md", headers={"X-Ragpod-Tenant": A}).status_code == 404
        assert client.get("/v1/documents/shared.md", headers={"X-Ragpod-Tenant": B}).status_code == 200
        assert client.get("/v1/documents/shared.md").status_code == 200
        search = {"query": "another tenant", "top_k": 3}
        assert client.post("/v1/search", json=search, headers={"X-Ragpod-Tenant": A}).json()["hits"] == []
        deleted = client.post("/v1/documents/delete", json={"prefix": "s"}, headers={"X-Ragpod-Tenant": B}).json()
        assert deleted == {"deleted": 1}
        assert client.get("/v1/documents/shared.md").status_code == 200
        bad = client.get("/v1/documents", headers={"X-Ragpod-Tenant": "../etc"})
        assert bad.status_code == 422 and bad.json()["detail"].startswith("X-Ragpod-Tenant:")


async def test_the_edge_store_indexes_the_tenant_field_marked_is_tenant(tmp_path: Path, embedder: Embedder) -> None:
    store = make_store("edge", tmp_path)
    await put(store, embedder, {"d": ["text"]}, A)
    try:
        await store.close()
        reopened = make_store("edge", tmp_path)  # the flag is kept on disk
        assert isinstance(reopened, EdgeStore)
        index = reopened._shard.info().payload_schema[TENANT]  # type: ignore[union-attr]
    finally:
        await reopened.close()
    assert index.params.is_tenant is True  # type: ignore[union-attr]


async def test_an_edge_store_from_before_tenants_gets_the_tenant_index_when_opened(
    tmp_path: Path, embedder: Embedder
) -> None:
    store = make_store("edge", tmp_path)
    await put(store, embedder, {"old.md": ["Stored before tenants."]}, None)
    assert isinstance(store, EdgeStore) and store._shard is not None
    store._shard.update(qe.UpdateOperation.delete_field_index(TENANT))  # as an older version created it
    await store.close()
    reopened = make_store("edge", tmp_path)
    try:
        assert isinstance(reopened, EdgeStore)
        assert TENANT in reopened._shard.info().payload_schema  # type: ignore[union-attr]
        assert [d.id for d in (await reopened.list_documents(10, None))[0]] == ["old.md"]
    finally:
        await reopened.close()
