"""One trace per question: the whole stack as real processes exporting to a real OTLP receiver in the test."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator

import httpx
import pytest

from ragpod.processes import free_port
from ragpod.supervisor import Stack
from tests.fixtures.models import MODEL_CACHE
from tests.fixtures.otlp import OtlpReceiver, ReceivedSpan, start_receiver

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FACT = {
    "id": "brindle-lamp",
    "text": "The Quillfeather Vantor is a solar-powered bicycle lamp first sold in 2011 in the city of Tarnwick.",
}
QUESTION = "In which year was the Quillfeather Vantor first sold?"

# The stage spans each service opens for one question (besides the HTTP server and client spans).
EXPECTED = {
    "gateway": {"validate", "retrieve", "admit", "queue.enqueue", "queue_wait", "generate", "attribute"},
    "retriever": {"embed", "search"},
    "embedding": {"embed_batch"},
    "llm": {"llm.job", "queue.read", "llm.generate", "queue.answer"},
}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    received, stop = start_receiver()
    yield received
    stop()


@pytest.fixture(scope="module")
def traced_stack(tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("traced")
    stack = Stack(
        ports={name: free_port() for name in ("gateway", "embedding", "retriever", "llm")},
        redis_port=free_port(),
        data_dir=data,
        log_dir=data / "logs",
        extra_env={
            "RAG_LLM_MODEL_CACHE_DIR": str(MODEL_CACHE),
            "RAG_LLM_MAX_NEW_TOKENS": "24",
            "RAG_UPSTREAM_TIMEOUT_SECONDS": "20",
            # Only the standard variables: the endpoint turns tracing on; each service names itself.
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    stack.start(ready_timeout=240)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def traced_gateway(traced_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{traced_stack.ports['gateway']}", timeout=180) as client:
        response = client.post("/v1/documents", json={"documents": [FACT]})
        assert response.status_code == 200, response.text
        yield client


def caller_trace() -> tuple[str, dict[str, str]]:
    """A trace id of the test's own and the W3C header that makes the question part of it."""
    trace_id = secrets.token_hex(16)
    return trace_id, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}


def of_trace(receiver: OtlpReceiver, trace_id: str) -> list[ReceivedSpan]:
    def complete(spans: list[ReceivedSpan]) -> bool:
        names = {(span.service, span.name) for span in spans if span.trace_id == trace_id}
        return all((service, name) in names for service, expected in EXPECTED.items() for name in expected)

    return [span for span in receiver.wait_for(complete) if span.trace_id == trace_id]


def check_one_trace(spans: list[ReceivedSpan]) -> None:
    by_service: dict[str, set[str]] = {}
    for span in spans:
        by_service.setdefault(span.service, set()).add(span.name)
    for service, expected in EXPECTED.items():
        assert expected <= by_service.get(service, set()), (service, sorted(by_service.get(service, set())))
    # The worker's spans continue from the gateway's enqueue span, through the job's traceparent field.
    (enqueue,) = [s for s in spans if s.service == "gateway" and s.name == "queue.enqueue"]
    (job,) = [s for s in spans if s.service == "llm" and s.name == "llm.job"]
    assert job.parent_id == enqueue.span_id
    # Every service's HTTP server span joins the trace (the traceparent header, hop by hop).
    servers = {s.service for s in spans if s.kind == 2}  # SPAN_KIND_SERVER
    assert {"gateway", "retriever", "embedding"} <= servers
    batches = [s for s in spans if s.name == "embed_batch"]
    assert all(s.attributes["ragpod.batch.size"] >= 1 for s in batches)
    assert all(s.links for s in batches)  # linked to the requests they served


def test_an_ask_is_one_trace_across_the_services_and_the_queue(
    traced_stack: Stack, traced_gateway: httpx.Client, receiver: OtlpReceiver
) -> None:
    trace_id, headers = caller_trace()
    response = traced_gateway.post("/v1/ask", json={"question": QUESTION, "top_k": 3}, headers=headers)
    assert response.status_code == 200, response.text

    spans = of_trace(receiver, trace_id)
    check_one_trace(spans)
    (generate,) = [s for s in spans if s.name == "llm.generate"]
    assert generate.attributes["ragpod.llm.stream"] is False
    # The logs carry the trace id: a line of the gateway's and of the worker's for this question.
    assert traced_stack.log_dir is not None
    for service in ("gateway", "llm"):
        lines = [
            json.loads(line)
            for line in (traced_stack.log_dir / f"{service}.log").read_text().splitlines()
            if line[:1] == "{"
        ]
        assert any(line.get("trace_id") == trace_id for line in lines), service


def test_a_streamed_ask_is_one_trace_too(traced_gateway: httpx.Client, receiver: OtlpReceiver) -> None:
    trace_id, headers = caller_trace()
    body = {"question": QUESTION, "top_k": 3, "stream": True}
    with traced_gateway.stream("POST", "/v1/ask", json=body, headers=headers) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("event:")]
    assert events[-1] == "event: done", events[-3:]

    spans = of_trace(receiver, trace_id)
    check_one_trace(spans)
    (generate,) = [s for s in spans if s.name == "llm.generate"]
    assert generate.attributes["ragpod.llm.stream"] is True
