from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from services.gateway.config import Settings
from services.gateway.pipeline import NOT_COVERED
from tests.gateway.conftest import HITS, Gateway

FLOOR = Settings().min_relevance
FAR = [
    {"document_id": "far", "chunk": 0, "score": round(FLOOR - 0.05, 3), "text": "Bread needs flour.", "metadata": {}},
    {"document_id": "farther", "chunk": 1, "score": 0.02, "text": "Rivers flow.", "metadata": {}},
]


def sse_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    blocks = [block for block in raw.split("\n\n") if block]
    return [
        (b.split("\n")[0].removeprefix("event: "), json.loads(b.split("\n")[1].removeprefix("data: "))) for b in blocks
    ]


async def stream_ask(gateway: Gateway, payload: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    async with gateway.client.stream("POST", "/v1/ask", json={**payload, "stream": True}) as response:
        assert response.status_code == 200
        return sse_events((await response.aread()).decode())


async def unanswered_count(gateway: Gateway) -> float:
    text = (await gateway.client.get("/metrics")).text
    line = next(line for line in text.splitlines() if line.startswith("rag_ask_unanswered_total "))
    return float(line.split()[1])


def embedded(gateway: Gateway) -> list[list[str]]:
    """The texts of each ``/v1/embed`` call the gateway made to the embedding service, in order."""
    return gateway.embedding.texts()


async def ask_while_generating(gateway: Gateway) -> asyncio.Task[Any]:
    """An answer on its way: the question asked and its job being generated (the engine slowed to 50 ms a
    word), for a test to look at meanwhile."""
    gateway.engine.delay = 0.05
    asking = asyncio.create_task(
        gateway.client.post("/v1/ask", json={"question": "When was the Zorblax first sold?", "top_k": 2})
    )
    await asyncio.wait_for(gateway.engine.started.wait(), 10)
    await asyncio.sleep(0.05)
    return asking


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


async def test_the_prompt_carries_the_sources_sentences_with_their_numbers_and_no_labels(gateway: Gateway) -> None:
    await gateway.client.post("/v1/ask", json={"question": "When?", "top_k": 2})
    (request,) = gateway.engine.calls
    system, user = request.messages
    assert system["role"] == "system" and "using only the sources" in system["content"]
    assert "[1] The Zorblax was first sold in 1987.\n\n[2] Unrelated." in user["content"]
    assert "source:" not in user["content"] and "zorblax," not in user["content"]  # labels get copied
    assert user["content"].endswith("Question: When?")


async def test_the_prompt_carries_the_sentences_that_answer_the_question_within_the_budget(
    gateway: Gateway,
) -> None:
    """Of a long chunk, the sentences most similar to the question reach the model, with their neighbours, in
    their order; the source returned is still the whole chunk; the question is embedded in the same call as
    the sources' sentences."""
    filler = [
        f"Paragraph {n} of the manual is about cleaning the {thing}."
        for n, thing in enumerate(
            ["lid", "handle", "cable", "base", "window", "filter", "spout", "switch", "light", "plug"] * 3
        )
    ]
    chunk = " ".join([*filler[:12], "The Zorblax was first sold in 1987.", "It cost 40 euros then.", *filler[12:]])
    gateway.retriever.hits = [{**HITS[0], "text": chunk}]
    question = "When was the Zorblax first sold?"
    body = (await gateway.client.post("/v1/ask", json={"question": question, "top_k": 1})).json()
    (request,) = gateway.engine.calls
    context = request.messages[-1]["content"]
    assert "The Zorblax was first sold in 1987. It cost 40 euros then." in context
    assert len(context) < Settings().max_context_chars + 200 < len(chunk)
    assert body["sources"][0]["text"] == chunk
    assert question in embedded(gateway)[0] and len(embedded(gateway)) == 2  # sources + question, then the answer


async def test_an_answer_with_a_number_not_in_its_source_falls_back_to_a_quote(gateway: Gateway) -> None:
    gateway.engine.reply = "The Zorblax was first sold in 1990."
    question = {"question": "When was the Zorblax first sold?", "top_k": 2}
    body = (await gateway.client.post("/v1/ask", json=question)).json()
    assert body["answer_kind"] == "extractive"
    assert body["answer"] == '"The Zorblax was first sold in 1987." [1]'
    assert body["grounded"] is True and [c["source"] for c in body["citations"]] == [1]
    assert body["sources"] == HITS


async def test_a_checked_answer_is_given_as_generated(gateway: Gateway) -> None:
    gateway.engine.reply = "The Zorblax was first sold in 1987 [1]."
    body = (await gateway.client.post("/v1/ask", json={"question": "When was the Zorblax first sold?"})).json()
    assert (body["answer_kind"], body["grounded"]) == ("generated", True)
    assert body["answer"] == "The Zorblax was first sold in 1987 [1]."


async def test_a_looping_answer_is_replaced_and_the_stream_announces_it_with_a_reset(gateway: Gateway) -> None:
    gateway.engine.reply = "The Zorblax was first sold in 1987, sold in 1987, sold in 1987, sold in 1987, sold in"
    events = await stream_ask(gateway, {"question": "When was the Zorblax first sold?", "top_k": 2})
    names = [name for name, _ in events]
    assert names[0] == "token" and names[-3:] == ["reset", "token", "done"]
    done = events[-1][1]
    assert done["answer_kind"] == "extractive"
    assert events[-2][1]["text"] == done["answer"] == '"The Zorblax was first sold in 1987." [1]'


async def test_a_question_no_source_sentence_supports_is_refused_after_generation(gateway: Gateway) -> None:
    """Sources above the floor, but no sentence of them answers the question: not covered, and the invention
    the model wrote is not shown."""
    gateway.engine.reply = "A Zorblax licence costs 300 euros per node."
    question = {"question": "How much does a licence cost per node?", "top_k": 2}
    body = (await gateway.client.post("/v1/ask", json=question)).json()
    assert gateway.engine.calls  # it was generated
    assert (body["answer_kind"], body["answer"], body["grounded"]) == ("not_covered", NOT_COVERED, False)
    assert body["sources"] == [] and body["citations"] == []


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
    async with gateway.client.stream(
        "POST", "/v1/ask", json={"question": "When did the Zorblax sell?", "stream": True}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = (await response.aread()).decode()
    events = [block for block in raw.split("\n\n") if block]
    names = [e.split("\n")[0].removeprefix("event: ") for e in events]
    datas = [json.loads(e.split("\n")[1].removeprefix("data: ")) for e in events]
    assert names[-1] == "done" and set(names[:-1]) == {"token"}
    joined = "".join(d["text"] for d in datas[:-1])
    assert joined == datas[-1]["answer"] == "answer to: Question: When did the Zorblax sell?"
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


async def test_an_uncovered_question_is_answered_at_once_and_no_job_reaches_the_stream(gateway: Gateway) -> None:
    gateway.retriever.hits = FAR
    before = await unanswered_count(gateway)
    response = await gateway.client.post("/v1/ask", json={"question": "How do I bake bread?", "top_k": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"] == NOT_COVERED and "do not cover" in body["answer"]
    assert body["sources"] == [] and body["citations"] == [] and body["grounded"] is False
    assert body["timings"]["generate_ms"] == 0 and body["timings"]["queue_ms"] == 0
    # Nothing was ever added to the job stream, and the model was never called.
    stream = await gateway.redis.xinfo_stream("rag:llm:jobs")
    assert stream["entries-added"] == 0 and stream["length"] == 0
    assert gateway.engine.calls == []
    assert await unanswered_count(gateway) == before + 1
    assert [r.url.path for r in gateway.retriever.requests] == ["/v1/search"]  # no attribution call either


async def test_an_uncovered_chat_question_counts_as_unanswered_too(gateway: Gateway) -> None:
    gateway.retriever.hits = FAR
    before = await unanswered_count(gateway)
    response = await gateway.client.post(
        "/v1/chat/completions", json={"model": "ragpod", "messages": [{"role": "user", "content": "Bake bread?"}]}
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == NOT_COVERED
    assert gateway.engine.calls == []
    assert await unanswered_count(gateway) == before + 1


async def test_an_uncovered_question_streams_the_same_answer_without_a_job(gateway: Gateway) -> None:
    gateway.retriever.hits = FAR
    events = await stream_ask(gateway, {"question": "How do I bake bread?"})
    assert [name for name, _ in events] == ["token", "done"]
    assert events[0][1]["text"] == NOT_COVERED
    done = events[1][1]
    assert done["answer"] == NOT_COVERED and done["sources"] == [] and done["grounded"] is False
    assert done["timings"]["generate_ms"] == 0
    assert (await gateway.redis.xinfo_stream("rag:llm:jobs"))["entries-added"] == 0


async def test_sources_below_the_floor_are_neither_in_the_prompt_nor_in_the_answer(gateway: Gateway) -> None:
    gateway.retriever.hits = [*HITS, *FAR]
    question = {"question": "When was the Zorblax first sold?", "top_k": 4}
    body = (await gateway.client.post("/v1/ask", json=question)).json()
    assert [s["document_id"] for s in body["sources"]] == ["zorblax", "other"]
    (request,) = gateway.engine.calls
    assert "far" not in request.messages[-1]["content"] and "[3]" not in request.messages[-1]["content"]


async def test_a_covered_answer_has_one_citation_per_sentence_naming_existing_sources(gateway: Gateway) -> None:
    response = await gateway.client.post("/v1/ask", json={"question": "When was the Zorblax first sold?", "top_k": 2})
    body = response.json()
    assert len(body["sources"]) == 2
    (citation,) = body["citations"]  # the scripted answer is one sentence
    assert citation["sentence"] == body["answer"]
    assert 1 <= citation["source"] <= len(body["sources"])
    assert citation["source"] == 1  # the Zorblax chunk, not "Unrelated."
    assert body["grounded"] == (citation["support"] >= Settings().min_support)
    assert body["citation_warnings"] == []
    sources_texts, answer_texts = embedded(gateway)
    assert sources_texts == ["The Zorblax was first sold in 1987.", "Unrelated.", "When was the Zorblax first sold?"]
    assert answer_texts == [body["answer"]]


async def test_the_sources_are_embedded_before_the_answer_is_generated(gateway: Gateway) -> None:
    asking = await ask_while_generating(gateway)
    assert not asking.done()
    (sources_texts,) = embedded(gateway)
    assert "The Zorblax was first sold in 1987." in sources_texts
    response = await asking
    assert response.status_code == 200 and response.json()["citations"]
    assert len(embedded(gateway)) == 2


async def test_without_the_embedding_service_the_answer_comes_unattributed_with_a_warning(
    gateway: Gateway,
) -> None:
    payload = {"question": "When was the Zorblax first sold?", "top_k": 2}
    gateway.embedding.down = True
    response = await gateway.client.post("/v1/ask", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"] == "answer to: Question: When was the Zorblax first sold?"
    assert body["sources"] == HITS
    assert body["citations"] == [] and body["grounded"] is None
    assert body["warnings"] == ["attribution skipped: embedding is unavailable: too many texts waiting"]
    assert len(gateway.engine.calls) == 1  # generated once: nothing to pay for again
    gateway.embedding.down = False
    again = (await gateway.client.post("/v1/ask", json=payload)).json()
    assert again["citations"] and again["grounded"] is not None and again["warnings"] == []


async def test_a_streamed_answer_without_the_embedding_service_ends_with_done_not_error(gateway: Gateway) -> None:
    gateway.embedding.down = True
    events = await stream_ask(gateway, {"question": "When was the Zorblax first sold?", "top_k": 2})
    kind, done = events[-1]
    assert kind == "done", events
    assert done["answer"] and done["citations"] == [] and done["grounded"] is None
    assert done["warnings"][0].startswith("attribution skipped: embedding is unavailable")


async def test_sources_not_embedded_ahead_are_embedded_with_the_answer(gateway: Gateway) -> None:
    gateway.embedding.down = True  # while the job is queued and generated
    asking = await ask_while_generating(gateway)
    gateway.embedding.down = False  # back before the answer is
    response = await asking
    assert response.status_code == 200
    citation = response.json()["citations"][0]
    assert citation["source"] == 1 and citation["support"] > 0.5
    texts = embedded(gateway)
    sources_and_question = ["The Zorblax was first sold in 1987.", "Unrelated.", "When was the Zorblax first sold?"]
    assert texts[0] == texts[1] == sources_and_question  # refused, then again


async def test_an_answer_that_repeats_a_source_sentence_needs_no_second_embedding_call(gateway: Gateway) -> None:
    question = "The Zorblax was first sold in 1987."
    # The scripted engine answers "answer to: Question: <question>": a source may hold that very sentence.
    gateway.retriever.hits = [{**HITS[0], "text": f"Sold. answer to: Question: {question}"}]
    body = (await gateway.client.post("/v1/ask", json={"question": question, "top_k": 1})).json()
    assert [c["support"] for c in body["citations"]] == [1.0]
    assert len(embedded(gateway)) == 1


async def test_streaming_and_plain_answers_carry_the_same_citations(gateway: Gateway) -> None:
    payload = {"question": "When was the Zorblax first sold?", "top_k": 2}
    plain = (await gateway.client.post("/v1/ask", json=payload)).json()
    events = await stream_ask(gateway, payload)
    name, done = events[-1]
    assert name == "done"
    assert plain["citations"] and done["citations"] == plain["citations"]
    for key in ("answer", "sources", "grounded", "citation_warnings"):
        assert done[key] == plain[key]
