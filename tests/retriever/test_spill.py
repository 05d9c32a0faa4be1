"""The retriever sends to the GPU embedding service and spills to the CPU one when it cannot answer."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from ragpod.processes import Proc, free_port, ready, start_service, wait_until
from services.common.errors import UpstreamUnavailable
from services.common.http import ServiceClient
from services.embedding.model import Embedder
from services.retriever.app import create_app
from services.retriever.config import Settings
from services.retriever.embedding import EmbeddingClient


def spilled(reason: str | None = None) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "rag_embedding_spill":
            for sample in metric.samples:
                if sample.name.endswith("_total") and reason in (None, sample.labels["reason"]):
                    total += sample.value
    return total


class Model:
    """An embedding service in-process: the real model, or an outage of one kind."""

    def __init__(self, embedder: Embedder, name: str) -> None:
        self.embedder = embedder
        self.name = name
        self.fail: str | None = None
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.fail == "saturated":
            return httpx.Response(503, json={"error": "overloaded", "detail": "too many texts waiting"})
        if self.fail == "timeout":
            raise httpx.ReadTimeout("no answer", request=request)
        if self.fail == "refused":
            raise httpx.ConnectError("connection refused", request=request)
        self.calls += 1
        texts = json.loads(request.content)["texts"]
        vectors = self.embedder.encode(texts)
        return httpx.Response(200, json={"vectors": vectors, "model": self.name, "dimension": 384, "device": "cpu"})


def pair(embedder: Embedder, cooldown: float = 0.0) -> tuple[EmbeddingClient, Model, Model]:
    gpu, cpu = Model(embedder, "gpu"), Model(embedder, "cpu")
    client = EmbeddingClient(
        ServiceClient("embedding", "http://gpu", 5, transport=httpx.MockTransport(gpu)),
        ServiceClient("embedding-cpu", "http://cpu", 5, transport=httpx.MockTransport(cpu)),
        cooldown_seconds=cooldown,
    )
    return client, gpu, cpu


@pytest.mark.parametrize("failure", ["saturated", "timeout", "refused"])
async def test_each_kind_of_failure_spills_to_the_cpu_service(embedder: Embedder, failure: str) -> None:
    client, gpu, cpu = pair(embedder)
    try:
        before = spilled()
        gpu.fail = failure
        embedded = await client.embed(["a question"])
        assert embedded.model == "cpu" and cpu.calls == 1
        assert spilled() == before + 1
        gpu.fail = None
        assert (await client.embed(["a question"])).model == "gpu"  # back at once with no cooldown
        assert spilled() == before + 1
    finally:
        await client.aclose()


async def test_after_a_refused_connection_the_gpu_service_rests_for_the_cooldown(embedder: Embedder) -> None:
    client, gpu, cpu = pair(embedder, cooldown=3600)
    try:
        gpu.fail = "refused"
        await client.embed(["one"])
        gpu.fail = None
        assert (await client.embed(["two"])).model == "cpu"  # not even tried: no timeout paid again
        assert gpu.calls == 0
    finally:
        await client.aclose()


async def test_a_503_does_not_start_a_cooldown(embedder: Embedder) -> None:
    client, gpu, _ = pair(embedder, cooldown=3600)
    try:
        gpu.fail = "saturated"
        await client.embed(["one"])
        gpu.fail = None
        assert (await client.embed(["two"])).model == "gpu"
    finally:
        await client.aclose()


async def test_without_a_cpu_service_the_error_names_the_embedding_service(embedder: Embedder) -> None:
    gpu = Model(embedder, "gpu")
    gpu.fail = "refused"
    client = EmbeddingClient(ServiceClient("embedding", "http://gpu", 5, transport=httpx.MockTransport(gpu)))
    try:
        with pytest.raises(UpstreamUnavailable, match="embedding is unavailable"):
            await client.embed(["one"])
    finally:
        await client.aclose()


def embed_requests(port: int) -> float:
    """Embed requests a real embedding process has answered, from its own /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("rag_http_requests_total{") and 'route="/v1/embed"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def embedding_processes(tmp_path: Path) -> Iterator[tuple[dict[str, int], dict[str, Proc]]]:
    ports = {"gpu": free_port(), "cpu": free_port()}
    procs: dict[str, Proc] = {}

    def start(name: str) -> None:
        env = {"RAG_PORT": str(ports[name]), "RAG_EMBEDDING_DEVICE": "cpu", "RAG_LOG_JSON": "false"}
        procs[name] = start_service("embedding", env, tmp_path / name)
        wait_until(lambda: ready(ports[name]), 120, f"embedding ({name})", procs[name])

    try:
        for name in ports:
            start(name)
        yield ports, procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.mark.slow
def test_spill_to_a_second_real_embedding_process_and_return(
    tmp_path: Path, embedding_processes: tuple[dict[str, int], dict[str, Proc]]
) -> None:
    ports, procs = embedding_processes
    settings = Settings(
        qdrant_path=str(tmp_path / "store"),
        embedding_url=f"http://127.0.0.1:{ports['gpu']}",
        embedding_cpu_url=f"http://127.0.0.1:{ports['cpu']}",
        embedding_spill_cooldown_seconds=0,
        upstream_timeout_seconds=10,
    )
    with TestClient(create_app(settings)) as client:

        def search() -> dict[str, object]:
            response = client.post("/v1/search", json={"query": "Which fruit is yellow?", "top_k": 1})
            assert response.status_code == 200, response.text
            return dict(response.json())

        docs = {"documents": [{"id": "fruit", "text": "Bananas are yellow."}]}
        assert client.post("/v1/documents", json=docs).status_code == 200
        gpu_before, cpu_before, spill_before = embed_requests(ports["gpu"]), embed_requests(ports["cpu"]), spilled()
        search()
        assert embed_requests(ports["gpu"]) == gpu_before + 1 and embed_requests(ports["cpu"]) == cpu_before
        assert spilled() == spill_before

        procs["gpu"].stop()  # the GPU service goes away: connections are refused
        hits = search()["hits"]
        assert hits[0]["document_id"] == "fruit"  # type: ignore[index]
        assert embed_requests(ports["cpu"]) == cpu_before + 1
        assert spilled("unreachable") >= 1 and spilled() == spill_before + 1

        env = {"RAG_PORT": str(ports["gpu"]), "RAG_EMBEDDING_DEVICE": "cpu", "RAG_LOG_JSON": "false"}
        procs["gpu"] = start_service("embedding", env, tmp_path / "gpu-again")
        wait_until(lambda: ready(ports["gpu"]), 120, "embedding (gpu, again)", procs["gpu"])
        gpu_now = embed_requests(ports["gpu"])
        search()  # it is back: the traffic returns to it
        assert embed_requests(ports["gpu"]) == gpu_now + 1
        assert embed_requests(ports["cpu"]) == cpu_before + 1
        assert spilled() == spill_before + 1
        metrics = client.get("/metrics").text
        assert re.search(r'rag_embedding_spill_total\{reason="unreachable"\} [1-9]', metrics)
