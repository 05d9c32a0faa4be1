"""One store suite, run against both backends (see conftest.py), with the real embedding model."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import AsyncQdrantClient, QdrantClient, models

from services.common.errors import DimensionMismatch
from services.embedding.model import Embedder
from services.retriever.chunking import point_id
from services.retriever.config import Settings
from services.retriever.store import ChunkPoint, EdgeStore, LegacyStore, ServerStore, VectorStore, replication_of
from services.retriever.store.base import by_fused_score
from services.retriever.text import KeywordEncoder, header, indexed_text
from tests.retriever.conftest import make_store

ENCODER = KeywordEncoder(800)


async def put(
    store: VectorStore,
    embedder: Embedder,
    docs: dict[str, list[str]],
    metadata: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Writes each document's chunks the way the indexer does (header embedded, chunk returned)."""
    points = []
    for doc_id, chunks in docs.items():
        texts = [indexed_text(header(doc_id, doc_id), chunk) for chunk in chunks]
        for i, (chunk, text, vector) in enumerate(zip(chunks, texts, embedder.encode(texts), strict=True)):
            payload = {
                "document_id": doc_id,
                "chunk": i,
                "chunks": len(chunks),
                "title": doc_id,
                "text": chunk,
                "metadata": (metadata or {}).get(doc_id, {}),
            }
            points.append(ChunkPoint(point_id(doc_id, i), vector, ENCODER.document(text), payload))
    await store.ensure_collection(embedder.dimension)
    await store.write(points, {doc_id: len(chunks) for doc_id, chunks in docs.items()})


async def ask(
    store: VectorStore,
    embedder: Embedder,
    question: str,
    top_k: int = 5,
    mode: str = "hybrid",
    fusion: str = "rrf",
    **f: Any,
):
    vector = embedder.encode([question])[0]
    return await store.search(vector, ENCODER.query(question), top_k, f or None, mode, fusion)  # type: ignore[arg-type]


random.seed(1)
ITEMS = [
    "gasket",
    "hinge",
    "bracket",
    "seal",
    "spring",
    "bolt",
    "clamp",
    "washer",
    "bearing",
    "valve",
    "hose",
    "filter",
]
CODES = [f"KX-{random.randint(1000, 9999)}" for _ in ITEMS]
PARTS = {
    f"part-{code}": [f"Part {code} is the {item} of the rear hatch; order it from the service portal."]
    for code, item in zip(CODES, ITEMS, strict=True)
}


ERRORS = {
    "errors-overview": [
        "Every error code the controller shows is listed in the manual, with what it means and what to do."
    ],
    "error-log": ["The error log keeps the last hundred error codes with the time each one appeared."],
    "reading-codes": [
        "To read an error code, open the display menu and choose Diagnostics; the code and its meaning are shown."
    ],
    "reset": ["After fixing the cause of an error, hold the reset button for three seconds to clear the error code."],
    "support": ["If an error code is not in the manual, call support with the code and the serial number."],
    "warning-codes": ["Warning codes mean the machine keeps running; error codes mean it has stopped."],
    "firmware": ["Firmware updates sometimes add new error codes and change what older error codes mean."],
    "e-codes": ["Codes starting with E are errors of the drive; codes starting with P are errors of the power supply."],
    "remote": ["Error codes can be read remotely through the monitoring portal, which emails each new error."],
    "repeat": ["An error code that comes back after a reset points to a hardware fault; stop the machine."],
    "conveyor": ["E4711 shows when the conveyor belt slips off its pulley; tighten the tensioner and restart."],
    "pump": ["The pump primes itself after a restart; air in the line makes it noisy for a minute."],
}


@pytest.mark.parametrize("fusion", ["rrf", "dbsf"])
@pytest.mark.parametrize("question", ["E4711", "got E4711 on the screen"])
async def test_hybrid_finds_an_error_code_that_dense_search_misses(
    store: VectorStore, embedder: Embedder, question: str, fusion: str
) -> None:
    await put(store, embedder, ERRORS)
    dense = await ask(store, embedder, question, mode="dense")
    assert dense[0].document_id != "conveyor"  # the premise: vectors alone rank the generic pages first
    hybrid = await ask(store, embedder, question, mode="hybrid", fusion=fusion)
    assert hybrid[0].document_id == "conveyor"


async def test_hybrid_order_with_score_fusion_does_not_depend_on_write_order(
    backend: str, tmp_path: Path, embedder: Embedder
) -> None:
    # Not asserted for rrf: two chunks with the same keyword score ("what does P mean": firmware and
    # reading-codes) get consecutive ranks in the order they are stored, so their fused ranks differ.
    fusion = "dbsf"
    questions = ["error code after a reset", "E4711", "read the codes remotely", "what does P mean"]
    orders = []
    for name, docs in (("forward", ERRORS), ("reversed", dict(reversed(ERRORS.items())))):
        store = make_store(backend, tmp_path / name)
        try:
            await put(store, embedder, docs)
            orders.append(
                [[(h.document_id, h.score) for h in await ask(store, embedder, q, 6, fusion=fusion)] for q in questions]
            )
        finally:
            await store.close()
    assert orders[0] == orders[1]


def test_equal_fused_scores_are_settled_by_the_closer_vector_then_the_id() -> None:
    @dataclass
    class Hit:
        id: str
        score: float

    hits = [Hit("c", 0.5), Hit("a", 0.5), Hit("b", 0.5), Hit("z", 0.9), Hit("d", 0.1)]
    cosines = [0.3, 0.3, 0.7, 0.2, 0.9]
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        ranked, scores = by_fused_score([hits[i] for i in order], [cosines[i] for i in order], 4)
        assert [h.id for h in ranked] == ["z", "b", "a", "c"]
        assert scores == [0.2, 0.7, 0.3, 0.3]


async def test_scores_are_the_dense_cosine_in_both_modes(store: VectorStore, embedder: Embedder) -> None:
    await put(store, embedder, PARTS)
    question = f"Which part is {CODES[3]}, the seal?"
    query = np.asarray(embedder.encode([question])[0])
    hybrid = await ask(store, embedder, question, top_k=6, mode="hybrid")
    dense = await ask(store, embedder, question, top_k=12, mode="dense")
    by_id = {(h.document_id, h.chunk): h.score for h in dense}
    assert len(hybrid) == 6
    for hit in hybrid:
        assert hit.score == pytest.approx(by_id[(hit.document_id, hit.chunk)], abs=1e-4)
        doc = np.asarray(embedder.encode([indexed_text(header(hit.document_id, hit.document_id), hit.text)])[0])
        cosine = float(doc @ query / (np.linalg.norm(doc) * np.linalg.norm(query)))
        assert hit.score == pytest.approx(cosine, abs=1e-3)
    assert [h.score for h in dense] == sorted((h.score for h in dense), reverse=True)


@pytest.mark.parametrize("mode", ["hybrid", "dense"])
async def test_filters_work_in_both_modes(store: VectorStore, embedder: Embedder, mode: str) -> None:
    await put(
        store,
        embedder,
        {"a": ["Pods are scheduled onto nodes by kube-scheduler."], "b": ["Pods are scheduled onto nodes too."]},
        {"a": {"team": "infra", "tier": 1}, "b": {"team": "apps", "tier": 2}},
    )
    hits = await ask(store, embedder, "kube-scheduler pods", mode=mode, team="apps")
    assert [h.document_id for h in hits] == ["b"]
    hits = await ask(store, embedder, "kube-scheduler pods", mode=mode, tier=1)
    assert [h.document_id for h in hits] == ["a"]
    assert await ask(store, embedder, "pods", mode=mode, team="nobody") == []


async def test_headers_are_embedded_but_the_chunk_is_returned(store: VectorStore, embedder: Embedder) -> None:
    await put(store, embedder, {"Zanzibar spice market": ["It opens at dawn and closes at noon."]})
    hit = (await ask(store, embedder, "When does the Zanzibar spice market open?", top_k=1))[0]
    assert hit.text == "It opens at dawn and closes at noon."
    assert hit.document_id == "Zanzibar spice market"


async def test_reindexing_a_shorter_document_leaves_no_stale_chunk(store: VectorStore, embedder: Embedder) -> None:
    await put(store, embedder, {"long": [f"Section {i} of the long manual." for i in range(6)], "other": ["Kept."]})
    assert await store.count() == 7
    await put(store, embedder, {"long": ["The whole manual in one chunk now."]})
    assert await store.count() == 2
    hits = await ask(store, embedder, "section of the manual", top_k=10)
    assert {(h.document_id, h.text) for h in hits} == {
        ("long", "The whole manual in one chunk now."),
        ("other", "Kept."),
    }
    assert (await store.get_document("long")).chunks == 1  # type: ignore[union-attr]


async def test_documents_are_listed_in_pages_read_and_deleted(store: VectorStore, embedder: Embedder) -> None:
    docs = {f"docs/{i:02d}.md": [f"Document {i} part {j}." for j in range(1 + i % 3)] for i in range(7)}
    await put(store, embedder, docs, {doc: {"n": n} for n, doc in enumerate(docs)})
    seen: dict[str, int] = {}
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = await store.list_documents(3, cursor)
        pages += 1
        assert len(page) <= 3
        seen.update({d.id: d.chunks for d in page})
        if cursor is None:
            break
    assert pages == 3
    assert seen == {doc: len(chunks) for doc, chunks in docs.items()}
    info = await store.get_document("docs/04.md")
    assert info is not None and info.chunks == 2 and info.metadata == {"n": 4}
    assert await store.delete_document("docs/04.md") is True
    assert await store.get_document("docs/04.md") is None
    assert await store.delete_document("docs/04.md") is False
    assert await store.count() == sum(len(c) for c in docs.values()) - 2
    assert all(h.document_id != "docs/04.md" for h in await ask(store, embedder, "Document 4 part 1", top_k=20))


async def test_documents_are_listed_in_id_order_and_the_cursor_follows_it(
    store: VectorStore, embedder: Embedder
) -> None:
    ids = ["b", "a/1", "a/0", "c", "a", "Z", "a/10", "a/2", "ä"]
    await put(store, embedder, {doc: [f"Text of {doc}."] for doc in ids})
    listed: list[str] = []
    after: str | None = None
    while True:
        page, after = await store.list_documents(2, after)
        listed.extend(d.id for d in page)
        if after is None:
            break
        assert after == page[-1].id
    assert listed == sorted(ids) == ["Z", "a", "a/0", "a/1", "a/10", "a/2", "b", "c", "ä"]
    # A document written between two pages appears where its id sorts; one deleted is skipped.
    first, after = await store.list_documents(3, None)
    await put(store, embedder, {"a/05": ["Written between the pages."]})
    await store.delete_document("a/10")
    rest: list[str] = []
    while after is not None:
        page, after = await store.list_documents(3, after)
        rest.extend(d.id for d in page)
    assert [d.id for d in first] + rest == ["Z", "a", "a/0", "a/05", "a/1", "a/2", "b", "c", "ä"]


async def test_documents_are_deleted_in_bulk_by_prefix_and_by_metadata(store: VectorStore, embedder: Embedder) -> None:
    # A thousand documents of two chunks each, written with one vector (the model would take a minute here).
    docs = {f"docs/{i:04d}.md": 2 for i in range(1000)} | {"docsite.md": 1, "notes/a.md": 1, "notes/b.md": 1}
    team = {"notes/a.md": "ops"}
    vector = embedder.encode(["A guide."])[0]
    points = [
        ChunkPoint(
            point_id(doc, i),
            vector,
            ENCODER.document("A guide."),
            {
                "document_id": doc,
                "chunk": i,
                "chunks": n,
                "text": "A guide.",
                "metadata": {"team": team.get(doc, "web")},
            },
        )
        for doc, n in docs.items()
        for i in range(n)
    ]
    await store.ensure_collection(embedder.dimension)
    await store.write(points, {})  # a new store: no older version to trim
    assert await store.delete_documents("docs/", None) == 1000
    assert await store.count() == 3
    assert await store.get_document("docs/0999.md") is None
    assert await store.delete_documents("docs/", None) == 0
    assert await store.delete_documents("notes/", {"team": "ops"}) == 1  # both must hold
    await put(store, embedder, {"flagged": ["Draft."], "unflagged": ["Final."]}, {"flagged": {"draft": True}})
    assert await store.delete_documents(None, {"draft": True}) == 1
    assert await store.get_document("unflagged") is not None
    assert await store.delete_document("unflagged") is True
    assert await store.delete_documents(None, {"team": "web"}) == 2
    assert await store.list_documents(10, None) == ([], None)
    assert await ask(store, embedder, "A guide", top_k=10) == []


async def test_an_empty_store_answers_empty(store: VectorStore, embedder: Embedder) -> None:
    assert await ask(store, embedder, "anything") == []
    assert await store.list_documents(10, None) == ([], None)
    assert await store.get_document("x") is None
    assert await store.delete_document("x") is False
    assert await store.delete_documents("x", None) == 0
    assert await store.count() == 0


async def test_another_dimension_fails_naming_both(store: VectorStore) -> None:
    await store.ensure_collection(384)
    with pytest.raises(DimensionMismatch) as caught:
        await store.ensure_collection(256)
    assert "384" in caught.value.detail and "256" in caught.value.detail


async def test_the_embedded_store_keeps_its_data_and_dimension_across_restarts(
    tmp_path: Path, embedder: Embedder
) -> None:
    store = make_store("edge", tmp_path)
    await put(store, embedder, {"kept": ["Written before the restart."]})
    await store.close()
    reopened = make_store("edge", tmp_path)
    try:
        assert reopened.dimension == embedder.dimension
        assert (await ask(reopened, embedder, "before the restart"))[0].text == "Written before the restart."
        with pytest.raises(DimensionMismatch, match="256"):
            await reopened.ensure_collection(256)
    finally:
        await reopened.close()


def test_a_store_left_by_the_old_local_mode_is_found_with_how_to_reindex(tmp_path: Path) -> None:
    old = QdrantClient(path=str(tmp_path / "qdrant"))
    old.create_collection("ragpod_chunks", vectors_config=models.VectorParams(size=4, distance=models.Distance.COSINE))
    old.close()
    with pytest.raises(LegacyStore) as caught:
        EdgeStore(tmp_path / "qdrant", "ragpod_chunks")
    message = str(caught.value)
    assert "local mode" in message and "ragpod ingest" in message and "RAG_QDRANT_PATH" in message


class RecordingClient(AsyncQdrantClient):
    """qdrant-client's local mode, remembering what a collection was created with."""

    created: dict[str, Any]

    async def create_collection(self, collection_name: str, **kwargs: Any) -> bool:  # type: ignore[override]
        self.created = {"collection_name": collection_name, **kwargs}
        return await super().create_collection(collection_name, **kwargs)


async def test_server_collections_are_created_replicated_from_settings() -> None:
    settings = Settings(
        qdrant_url="http://qdrant:6333",
        qdrant_replication_factor=3,
        qdrant_shards=6,
        qdrant_write_consistency=2,
    )
    client = RecordingClient(location=":memory:")
    store = ServerStore(client, "c", replication_of(settings))
    try:
        await store.ensure_collection(8)
    finally:
        await store.close()
    assert client.created["replication_factor"] == 3
    assert client.created["shard_number"] == 6
    assert client.created["write_consistency_factor"] == 2


def test_replication_defaults_fit_the_three_node_statefulset() -> None:
    settings = Settings()
    assert (settings.qdrant_replication_factor, settings.qdrant_shards, settings.qdrant_write_consistency) == (2, 3, 1)
    with pytest.raises(ValueError, match="RAG_QDRANT_WRITE_CONSISTENCY"):
        Settings(qdrant_replication_factor=1, qdrant_write_consistency=2)


def test_the_service_refuses_to_start_on_an_old_store_with_one_clear_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    old = QdrantClient(path=str(tmp_path / "qdrant"))
    old.create_collection("ragpod_chunks", vectors_config=models.VectorParams(size=4, distance=models.Distance.COSINE))
    old.close()
    env = {**os.environ, "RAG_QDRANT_PATH": str(tmp_path / "qdrant"), "RAG_QDRANT_URL": "", "RAG_PORT": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "services.retriever"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "qdrant-client's local mode" in done.stderr and "ragpod ingest" in done.stderr


async def test_the_embedded_store_builds_its_hnsw_index_as_points_arrive(tmp_path: Path) -> None:
    import qdrant_edge

    store = EdgeStore(tmp_path / "edge", "c", index_after=100, indexing_threshold_kb=50)
    rng = np.random.default_rng(3)
    await store.ensure_collection(64)
    vectors = rng.standard_normal((400, 64)).astype(np.float32)
    points = [
        ChunkPoint(
            point_id("d", i),
            vectors[i].tolist(),
            ENCODER.document(f"chunk {i}"),
            {"document_id": f"d{i}", "chunk": 0, "chunks": 1, "text": f"chunk {i}", "metadata": {}},
        )
        for i in range(400)
    ]
    for start in range(0, 400, 50):
        await store.write(points[start : start + 50], {})
    shard = store._shard
    assert isinstance(shard, qdrant_edge.EdgeShard)
    assert shard.info().indexed_vectors_count >= 300  # written and put in the index without being asked
    hits = await store.search(vectors[7].tolist(), None, 1, None, "dense")
    assert hits[0].text == "chunk 7"
    await store.close()
