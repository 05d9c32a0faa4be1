"""The retriever sends to the GPU embedding service and spills to the CPU one when it cannot answer: two real
embedding processes (the client itself is tested in tests/common/test_embedding.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from ragpod.processes import Proc, free_port, ready, start_service, wait_until
from services.retriever.app import create_app
from services.retriever.config import Settings
from tests.common.test_embedding import spilled


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
