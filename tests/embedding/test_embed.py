"""The embedding service in-process, with the real all-MiniLM-L6-v2 on the CPU."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from services.embedding.app import create_app
from services.embedding.config import Settings
from services.embedding.model import Batcher, Embedder


@pytest.fixture(scope="module")
def client(embedder: Embedder) -> Iterator[TestClient]:
    app = create_app(Settings(embedding_max_texts=8, embedding_max_text_chars=500), embedder=embedder)
    with TestClient(app) as client:
        for _ in range(100):
            if client.get("/readyz").status_code == 200:
                break
        yield client


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))


def test_embed_returns_one_normalised_384_dim_vector_per_text(client: TestClient) -> None:
    response = client.post("/v1/embed", json={"texts": ["a cat sat on the mat", "kubernetes schedules pods"]})
    assert response.status_code == 200
    body = response.json()
    assert body["dimension"] == 384
    assert body["device"] == "cpu"
    assert body["model"] == "all-MiniLM-L6-v2"
    assert len(body["vectors"]) == 2
    for vector in body["vectors"]:
        assert len(vector) == 384
        assert math.isclose(math.hypot(*vector), 1.0, rel_tol=1e-4)


def test_similar_texts_are_closer_than_unrelated_ones(client: TestClient) -> None:
    texts = ["The cat sleeps on the sofa.", "A kitten is napping on the couch.", "GPU nodes run the LLM pods."]
    a, b, c = client.post("/v1/embed", json={"texts": texts}).json()["vectors"]
    assert cosine(a, b) > cosine(a, c) + 0.2


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"texts": []}, "texts"),
        ({"texts": ["ok", "   "]}, "texts.1"),
        ({"texts": "not a list"}, "texts"),
        ({}, "texts"),
        ({"texts": ["x"] * 9}, "texts"),
        ({"texts": ["x" * 501]}, "texts.0"),
    ],
)
def test_bad_input_is_422_naming_the_field(client: TestClient, payload: dict[str, object], field: str) -> None:
    response = client.post("/v1/embed", json=payload)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(field)


def test_health_ready_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").json()["checks"] == {"model": "ok"}
    client.post("/v1/embed", json={"texts": ["metrics please"]})
    text = client.get("/metrics").text
    assert "rag_embedding_batch_size_count" in text
    assert 'rag_model_info{device="cpu",model="all-MiniLM-L6-v2",service="embedding"} 1.0' in text
    assert 'route="/v1/embed"' in text
    assert 'route="/healthz"' not in text


class RecordingEmbedder:
    """Stands in for the model to observe how the batcher groups requests."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def encode(self, texts: list[str], batch_size: int = 64) -> list[list[float]]:
        self.batches.append(len(texts))
        return [[float(len(t))] for t in texts]


async def test_concurrent_requests_are_micro_batched_and_answered_in_order() -> None:
    recorder = RecordingEmbedder()
    batcher = Batcher(recorder, max_batch=64, max_wait_ms=50)  # type: ignore[arg-type]
    batcher.start()
    try:
        requests = [["a" * (i + 1), "b" * (i + 2)] for i in range(10)]
        results = await asyncio.gather(*(batcher.embed(texts) for texts in requests))
    finally:
        await batcher.stop()
    assert results == [[[float(i + 1)], [float(i + 2)]] for i in range(10)]
    assert sum(recorder.batches) == 20
    assert len(recorder.batches) < 10  # ten requests, fewer model calls


async def test_batches_never_exceed_max_batch_of_requests() -> None:
    recorder = RecordingEmbedder()
    batcher = Batcher(recorder, max_batch=4, max_wait_ms=50)  # type: ignore[arg-type]
    batcher.start()
    try:
        await asyncio.gather(*(batcher.embed([str(i)]) for i in range(10)))
    finally:
        await batcher.stop()
    assert max(recorder.batches) <= 4
    assert sum(recorder.batches) == 10
