from __future__ import annotations

import asyncio
import json

import pytest

from tests.gateway.conftest import HITS, Gateway


async def test_ask_returns_the_answer_with_sources_and_timings(gateway: Gateway) -> None:
    response = await gateway.client.post("/v1/ask", json={"question": "When was the Zorblax first sold?", "top_k": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"] == "answer to: Question: When was the Zorblax first sold?"
    assert body["sources"] == HITS
    t = body["timings"]
    assert t["embed_ms"] == 3.0 and t["search_ms"] == 2.0
    assert t["queue_ms"] >= 0 and t["generate_ms"] >= 0
    assert t["embed_ms"] + t["search_ms"] + t["queue_ms"] + t["generate_ms"] <= t["total_ms"] + 5.0 + 0.01
    assert response.headers["x-request-id"]


async def test_the_prompt_carries_the_chunks_marked_with_their_sources(gateway: Gateway) -> None:
    await gateway.client.post("/v1/ask", json={"question": "When?", "top_k": 2})
    (request,) = gateway.engine.calls
    system, user = request.messages
    assert system["role"] == "system" and "using only the sources" in system["content"]
    assert "[1] (source: zorblax, chunk 0)\nThe Zorblax was first sold in 1987." in user["content"]
    assert "[2] (source: other, chunk 2)" in user["content"]
    assert user["content"].endswith("Question: When?")


async def test_request_id_travels_to_the_retriever(gateway: Gateway) -> None:
    await gateway.client.post("/v1/ask", json={"question": "q"}, headers={"X-Request-ID": "abc123"})
    assert gateway.retriever.requests[-1].headers["x-request-id"] == "abc123"


async def test_the_job_is_acknowledged_and_its_events_cleaned_up(gateway: Gateway) -> None:
    await gateway.client.post("/v1/ask", json={"question": "q"})
    # The answer is published just before the acknowledgement: allow the worker a moment.
    for _ in range(50):
        info = await gateway.redis.xinfo_groups("rag:llm:jobs")
        if info[0]["pending"] == 0:
            break
        await asyncio.sleep(0.05)
    assert info[0]["pending"] == 0 and info[0]["lag"] == 0
    assert await gateway.redis.xlen("rag:llm:jobs") == 0  # acknowledged entries are deleted
    assert await gateway.redis.keys("rag:llm:jobs:events:*") == []


async def test_streaming_sends_tokens_then_sources_and_timings(gateway: Gateway) -> None:
    async with gateway.client.stream("POST", "/v1/ask", json={"question": "stream me", "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = (await response.aread()).decode()
    events = [block for block in raw.split("\n\n") if block]
    names = [e.split("\n")[0].removeprefix("event: ") for e in events]
    datas = [json.loads(e.split("\n")[1].removeprefix("data: ")) for e in events]
    assert names[-1] == "done" and set(names[:-1]) == {"token"}
    joined = "".join(d["text"] for d in datas[:-1])
    assert joined == datas[-1]["answer"] == "answer to: Question: stream me"
    assert datas[-1]["sources"] == HITS[:5]
    assert set(datas[-1]["timings"]) == {"embed_ms", "search_ms", "queue_ms", "generate_ms", "total_ms"}


async def test_documents_are_forwarded_to_the_retriever(gateway: Gateway) -> None:
    docs = [{"id": "a", "text": "alpha"}, {"id": "b", "text": "beta", "metadata": {"x": 1}}]
    response = await gateway.client.post("/v1/documents", json={"documents": docs})
    assert response.json() == {"indexed": 2, "chunks": 2}
    sent = json.loads(gateway.retriever.requests[-1].content)
    assert sent["documents"][1] == {"id": "b", "text": "beta", "metadata": {"x": 1}}


async def test_metrics_use_route_templates(gateway: Gateway) -> None:
    await gateway.client.post("/v1/ask", json={"question": "q"})
    text = (await gateway.client.get("/metrics")).text
    assert 'rag_http_requests_total{method="POST",route="/v1/ask",service="gateway",status="200"}' in text


async def test_web_page_is_served(gateway: Gateway) -> None:
    response = await gateway.client.get("/")
    assert response.status_code == 200 and "/v1/ask" in response.text


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health(gateway: Gateway, path: str) -> None:
    response = await gateway.client.get(path)
    assert response.status_code == 200
