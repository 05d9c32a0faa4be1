"""The embedding service in-process, with the real all-MiniLM-L6-v2 on the CPU."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from services.common.logging import REQUEST_ID_HEADER
from services.embedding.app import create_app
from services.embedding.config import Settings
from services.embedding.model import Batcher, Embedder
from services.embedding.routes import EmbedFastPath


@pytest.fixture(scope="module")
def client(embedder: Embedder) -> Iterator[TestClient]:
    app = create_app(Settings(embedding_max_texts=8, embedding_max_text_chars=500), embedder=embedder)
    with TestClient(app) as client:
        for _ in range(100):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert client.get("/readyz").status_code == 200, "the embedding model did not become ready"
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


def test_embed_is_answered_inside_the_request_id_and_metrics_middlewares(client: TestClient) -> None:
    # The fast path is the innermost middleware: the request id and the metrics wrap it as any route.
    middlewares = [m.cls for m in client.app.user_middleware]  # type: ignore[attr-defined]
    assert middlewares[-1] is EmbedFastPath, middlewares
    response = client.post("/v1/embed", json={"texts": ["echo my id"]}, headers={REQUEST_ID_HEADER: "embed-42"})
    assert response.status_code == 200
    assert response.headers[REQUEST_ID_HEADER] == "embed-42"


class FailingEncoder:
    name, device, dimension = "stand-in", "cpu", 1

    def encode(self, texts: list[str], batch_size: int = 64) -> list[list[float]]:
        raise RuntimeError("the model broke")


def test_a_failing_model_is_answered_500_in_the_error_shape_with_the_request_id() -> None:
    app = create_app(Settings(), embedder=FailingEncoder())  # type: ignore[arg-type]
    with TestClient(app) as client:
        for _ in range(100):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        response = client.post("/v1/embed", json={"texts": ["x"]}, headers={REQUEST_ID_HEADER: "broken-1"})
        assert response.status_code == 500
        assert response.json()["error"] == "internal_error" and "broken-1" in response.json()["detail"]
        assert response.headers.get_list(REQUEST_ID_HEADER) == ["broken-1"]  # answered inside the middlewares, once
        metrics = client.get("/metrics").text
    assert 'route="/v1/embed",service="embedding",status="500"' in metrics


class GatedEncoder:
    """Stands in for the model to observe how requests are grouped: each ``encode`` waits for ``gate``."""

    name, device, dimension = "stand-in", "cpu", 1

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def encode(self, texts: list[str], batch_size: int = 64) -> list[list[float]]:
        self.batches.append(list(texts))
        self.gate.wait(timeout=30)
        return [[float(len(t))] for t in texts]


async def test_waiting_requests_are_batched_by_text_count_and_answered_in_order() -> None:
    encoder = GatedEncoder()
    batcher = Batcher(encoder, max_batch=6, max_wait_ms=0)
    batcher.start()
    try:
        encoder.gate.clear()
        first = asyncio.create_task(batcher.embed(["held"]))  # the model is busy with this one...
        await until(lambda: len(encoder.batches) == 1)
        requests = [["a" * (i + 1), "b" * (i + 2)] for i in range(5)]  # ...while these five queue
        tasks = [asyncio.create_task(batcher.embed(texts)) for texts in requests]
        await until(lambda: batcher.pending == 10)
        encoder.gate.set()
        assert await first == [[4.0]]
        results = await asyncio.gather(*tasks)
    finally:
        await batcher.stop()
    assert results == [[[float(i + 1)], [float(i + 2)]] for i in range(5)]
    # Six texts at most per model call, a request's texts never split: 3 requests, then 2.
    assert [len(batch) for batch in encoder.batches] == [1, 6, 4]


async def until(condition: Callable[[], bool]) -> None:
    """Lets the loop run until ``condition`` holds (a state to reach, not a time to wait)."""
    async with asyncio.timeout(30):
        while True:
            if condition():
                return
            await asyncio.sleep(0.001)
