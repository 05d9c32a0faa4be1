"""The embedding service under load: what the autoscaler reads, the bound on waiting texts, the CPU fallback.

The bound is reached deterministically: a stand-in model holds its first batch
while later requests queue, observed through /metrics (no timing). The fallback
runs the real all-MiniLM-L6-v2: a CUDA out-of-memory error is injected into
the model the service runs first (tests/gpu/ does the same on a real GPU).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import torch

from services.embedding import app as embedding_app
from services.embedding.app import create_app
from services.embedding.config import Settings
from services.embedding.model import Batcher, Embedder, ModelThreads
from tests.fixtures.apps import in_process


class GatedEncoder:
    """A stand-in model whose every ``encode`` waits for ``gate``."""

    name, device, dimension = "stand-in", "cpu", 1

    def __init__(self) -> None:
        self.gate = threading.Event()

    def encode(self, texts: list[str], batch_size: int = 64) -> list[list[float]]:
        self.gate.wait(timeout=30)
        return [[1.0] for _ in texts]


def metric(text: str, name: str) -> float:
    """One unlabelled sample from Prometheus text (0 when absent)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def metrics(client: httpx.AsyncClient) -> str:
    return (await client.get("/metrics")).text


async def until_metrics(client: httpx.AsyncClient, **wanted: float) -> None:
    """Waits until /metrics shows the wanted values (a state to reach, not a time to wait)."""
    async with asyncio.timeout(30):
        while True:
            text = await metrics(client)
            if all(metric(text, name) == value for name, value in wanted.items()):
                return
            await asyncio.sleep(0.01)


async def until_ready(client: httpx.AsyncClient) -> None:
    async with asyncio.timeout(30):
        while True:
            if (await client.get("/readyz")).status_code == 200:
                return
            await asyncio.sleep(0.01)


@pytest.fixture
async def gated() -> AsyncIterator[tuple[httpx.AsyncClient, GatedEncoder]]:
    encoder = GatedEncoder()
    # One batch at a time: the held one, and the rest waiting behind it.
    settings = Settings(
        embedding_max_texts=2, embedding_max_pending=3, embedding_retry_after_seconds=7, embedding_workers=1
    )
    async with in_process(create_app(settings, embedder=encoder)) as client:  # type: ignore[arg-type]
        await until_ready(client)
        try:
            yield client, encoder
        finally:
            encoder.gate.set()


async def test_texts_beyond_max_pending_get_503_with_retry_after(
    gated: tuple[httpx.AsyncClient, GatedEncoder],
) -> None:
    client, encoder = gated
    before = await metrics(client)
    rejected = metric(before, "rag_embedding_rejected_total")
    held = asyncio.create_task(client.post("/v1/embed", json={"texts": ["held by the model"]}))
    await until_metrics(client, rag_embedding_requests_in_flight=1, rag_embedding_pending_texts=0)
    queued = [asyncio.create_task(client.post("/v1/embed", json={"texts": t})) for t in (["a", "b"], ["c"])]
    await until_metrics(client, rag_embedding_requests_in_flight=3, rag_embedding_pending_texts=3)

    refused = await client.post("/v1/embed", json={"texts": ["one too many"]})
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "7"
    assert refused.json()["error"] == "queue_full"
    assert "RAG_EMBEDDING_MAX_PENDING=3" in refused.json()["detail"]
    assert metric(await metrics(client), "rag_embedding_rejected_total") == rejected + 1

    encoder.gate.set()
    answers = await asyncio.gather(held, *queued)
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert [len(r.json()["vectors"]) for r in answers] == [1, 2, 1]
    await until_metrics(client, rag_embedding_requests_in_flight=0, rag_embedding_pending_texts=0)
    text = await metrics(client)
    assert metric(text, "rag_embedding_batch_wait_seconds_count") >= 3  # one observation per request
    assert "rag_embedding_fallback_total" in text


def test_max_pending_below_max_texts_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="RAG_EMBEDDING_MAX_PENDING must be at least RAG_EMBEDDING_MAX_TEXTS"):
        Settings(embedding_max_texts=64, embedding_max_pending=8)


class OutOfMemoryOnce:
    """The model as a GPU that runs out of memory on the next batch."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")


async def test_cuda_out_of_memory_reruns_the_batch_on_the_cpu(embedder: Embedder) -> None:
    texts = ["The cat sleeps on the sofa.", "GPU nodes run the LLM pods."]
    expected = embedder.encode(texts)
    gpu = Embedder("", "cpu")
    # Stand-ins for the CUDA side: its model fails with CUDA's own error; the CPU copy is loaded on need.
    gpu.device, gpu._model, gpu._cpu_model = "cuda", OutOfMemoryOnce(), None
    async with in_process(create_app(Settings(), embedder=gpu)) as client:
        await until_ready(client)
        fallbacks = metric(await metrics(client), "rag_embedding_fallback_total")
        response = await client.post("/v1/embed", json={"texts": texts})
        assert response.status_code == 200
        vectors = response.json()["vectors"]
        assert torch.allclose(torch.tensor(vectors), torch.tensor(expected), atol=1e-5)
        assert metric(await metrics(client), "rag_embedding_fallback_total") == fallbacks + 1
    assert gpu._model.calls == 1


async def test_other_errors_are_not_hidden_by_the_fallback(embedder: Embedder) -> None:
    class Broken:
        def encode(self, *args: Any, **kwargs: Any) -> Any:
            raise ValueError("tokenizer exploded")

    gpu = Embedder("", "cpu")
    gpu.device, gpu._model, gpu._cpu_model = "cuda", Broken(), None
    with pytest.raises(ValueError, match="tokenizer exploded"):
        gpu.encode(["x"])
    assert gpu._cpu_model is None  # no CPU copy was loaded for it


class ThreadRecorder:
    """A stand-in model noting, for every call, the thread it ran on and that thread's torch threads."""

    name, device, dimension = "stand-in", "cpu", 1

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def encode(self, texts: list[str], batch_size: int = 64) -> list[list[float]]:
        self.calls.append((threading.current_thread().name, torch.get_num_threads()))
        return [[1.0] for _ in texts]


async def test_the_model_runs_only_on_its_own_threads_each_with_its_share_of_torch_threads() -> None:
    own = torch.get_num_threads()
    share = 1 if own > 1 else 2  # anything but this thread's own count, to see it set
    threads = ModelThreads(1, share)
    recorder = ThreadRecorder()
    loaded_on = await threads.run(lambda: threading.current_thread().name)  # as the service loads its model
    batcher = Batcher(recorder, max_batch=8, max_wait_ms=0, threads=threads)
    batcher.start()
    try:
        for _ in range(3):
            await asyncio.gather(*(batcher.embed([f"text {i}"]) for i in range(5)))
    finally:
        await batcher.stop()
        torch.set_num_threads(own)  # torch also keeps the last count set as the default of threads to come
    assert loaded_on.startswith("embedding-model")
    assert recorder.calls and set(recorder.calls) == {(loaded_on, share)}
    assert torch.get_num_threads() == own


async def test_the_entry_points_app_freezes_its_heap_once_its_model_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[str] = []

    def load(model_path: str, device: str) -> ThreadRecorder:
        steps.append("loaded")
        return ThreadRecorder()

    def freeze() -> int:
        steps.append("frozen")
        return 1

    monkeypatch.setattr(embedding_app, "load_embedder", load)
    monkeypatch.setattr(embedding_app, "freeze_heap", freeze)
    async with in_process(create_app(Settings(), freeze_after_load=True)) as client:
        await until_ready(client)
        assert (await client.post("/v1/embed", json={"texts": ["after"]})).status_code == 200
    assert steps == ["loaded", "frozen"]
    steps.clear()
    async with in_process(create_app(Settings())) as client:  # as tests make it: nothing frozen
        await until_ready(client)
    assert steps == ["loaded"]
