"""The whole stack as real processes: redis-server on a free port, the four services, the real models."""

from __future__ import annotations

import httpx
import pytest

from ragpod.processes import ready, wait_until
from ragpod.supervisor import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FACT = {
    "id": "quillfeather-vantor",
    "text": (
        "The Quillfeather Vantor is a solar-powered bicycle lamp made by Brindlemoor Optics. "
        "The Quillfeather Vantor was first sold in 2011, in the city of Tarnwick."
    ),
    "metadata": {"kind": "product"},
}
DISTRACTORS = [
    {"id": "qdrant", "text": "Qdrant stores vectors and searches them by cosine similarity on high-memory nodes."},
    {"id": "bread", "text": "Sourdough bread rises because wild yeast and lactic bacteria ferment the dough."},
    {"id": "tides", "text": "Ocean tides follow the pull of the moon, with two high tides on most days."},
]
QUESTION = "In which year was the Quillfeather Vantor first sold?"


def points(stack: Stack) -> int:
    response = httpx.get(f"http://127.0.0.1:{stack.ports['retriever']}/v1/stats", timeout=10)
    return int(response.json()["points"])


def ask(gateway: httpx.Client) -> httpx.Response:
    return gateway.post("/v1/ask", json={"question": QUESTION, "top_k": 3})


@pytest.fixture(scope="module")
def indexed(stack: Stack, gateway: httpx.Client) -> dict[str, int]:
    """The fact and its distractors, indexed once for the tests of this module."""
    response = gateway.post("/v1/documents", json={"documents": [FACT, *DISTRACTORS]})
    assert response.status_code == 200, response.text
    result: dict[str, int] = response.json()
    return result


def test_index_and_ask_a_fact_only_the_documents_know(indexed: dict[str, int], gateway: httpx.Client) -> None:
    assert indexed == {"indexed": 4, "chunks": 4}

    response = ask(gateway)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["sources"][0]["document_id"] == "quillfeather-vantor"
    assert body["sources"][0]["metadata"] == {"kind": "product"}
    # At most top_k sources; the distractors may fall below the relevance floor and be dropped.
    assert 1 <= len(body["sources"]) <= 3
    assert {s["document_id"] for s in body["sources"]} <= {"quillfeather-vantor", *(d["id"] for d in DISTRACTORS)}
    assert isinstance(body["answer"], str) and body["answer"].strip()
    # Greedy decoding over the retrieved chunk: the model repeats the year it could only have read there.
    assert "2011" in body["answer"], body["answer"]
    assert body["model"] == "smollm2-135m-instruct"
    # Every stage was measured, and the stages fit inside the whole (how fast is bench/'s business).
    t = body["timings"]
    assert all(t[k] > 0 for k in ("embed_ms", "search_ms", "generate_ms", "total_ms"))
    assert t["embed_ms"] + t["search_ms"] + t["queue_ms"] + t["generate_ms"] <= t["total_ms"]


def test_reindexing_the_same_documents_keeps_the_chunk_count(
    indexed: dict[str, int], stack: Stack, gateway: httpx.Client
) -> None:
    before = points(stack)
    again = gateway.post("/v1/documents", json={"documents": [FACT, *DISTRACTORS]})
    assert again.json() == {"indexed": 4, "chunks": 4}
    assert points(stack) == before
    response = ask(gateway)
    assert response.status_code == 200
    assert response.json()["sources"][0]["document_id"] == "quillfeather-vantor"


def test_every_service_serves_health_and_metrics(stack: Stack) -> None:
    for name, port in stack.ports.items():
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200, name
        assert ready(port), name
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "rag_" in metrics, name
    llm_metrics = httpx.get(f"http://127.0.0.1:{stack.ports['llm']}/metrics", timeout=5).text
    assert "rag_llm_queue_depth" in llm_metrics
    assert "rag_llm_tokens_generated_total" in llm_metrics


@pytest.mark.parametrize("service", ["embedding", "retriever"])
def test_a_dependency_down_is_a_clear_503_and_recovery_is_automatic(
    indexed: dict[str, int], stack: Stack, gateway: httpx.Client, service: str
) -> None:
    before = points(stack)
    others = {p.name: p.pid for p in stack.procs if p.name != service}
    proc = stack.proc(service)
    proc.stop()
    assert not proc.alive()
    try:
        response = ask(gateway)
        assert response.status_code == 503
        assert response.json()["error"] == "upstream_unavailable"
        assert service in response.json()["detail"]
        documents = gateway.post("/v1/documents", json={"documents": [FACT]})
        assert documents.status_code == 503
    finally:
        restarted = stack.start_one(service)
        # Raises unless the service answers /readyz with 200 in time.
        wait_until(lambda: ready(stack.ports[service]), 120, service, restarted)
    # Nothing else was restarted: the others reconnect on their own.
    assert {p.name: p.pid for p in stack.procs if p.name != service} == others
    response = ask(gateway)
    assert response.status_code == 200, response.text
    assert response.json()["sources"][0]["document_id"] == "quillfeather-vantor"
    assert points(stack) == before  # the failed /v1/documents wrote nothing
