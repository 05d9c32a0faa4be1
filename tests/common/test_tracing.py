"""Tracing: off unless the standard OTEL_* variables turn it on; on, the trace travels over HTTP and the queue."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import httpx
import httpx2
import pytest
import structlog
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.common import tracing
from services.common.app import OK, Checks, add_common_routes
from services.common.batcher import MicroBatcher
from services.common.http import ServiceClient
from services.common.queue import Job
from services.llm.config import Settings as LlmSettings
from services.llm.engine import GenerationRequest
from services.llm.openai_engine import OpenAIEngine

OTEL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_SDK_DISABLED",
)


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_off_by_default_and_on_with_the_standard_variables(no_otel_env: pytest.MonkeyPatch) -> None:
    assert not tracing.TracingSettings().enabled
    no_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert tracing.TracingSettings().enabled
    no_otel_env.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.TracingSettings().enabled
    no_otel_env.delenv("OTEL_SDK_DISABLED")
    no_otel_env.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    no_otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:4318/v1/traces")
    no_otel_env.setenv("OTEL_SERVICE_NAME", "gateway-eu")
    settings = tracing.TracingSettings()
    assert settings.enabled and settings.service_name == "gateway-eu"


def test_off_installs_nothing(no_otel_env: pytest.MonkeyPatch) -> None:
    assert tracing.setup("gateway") is False
    assert not tracing.enabled()
    app = make_app()
    assert not any("OpenTelemetry" in m.cls.__name__ for m in app.user_middleware)  # type: ignore[attr-defined]
    assert tracing.traceparent() == ""


async def ready() -> Checks:
    return {"self": OK}


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/thing")
    async def thing() -> dict[str, str]:
        return {"trace_id": format(trace.get_current_span().get_span_context().trace_id, "032x")}

    add_common_routes(app, "test", ready)
    return app


def recording_client(seen: list[httpx.Request]) -> ServiceClient:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    return ServiceClient("retriever", "http://retriever", 5.0, transport=httpx.MockTransport(handler))


async def test_off_a_call_carries_no_traceparent() -> None:
    seen: list[httpx.Request] = []
    client = recording_client(seen)
    await client.post("/v1/search", {"query": "q"})
    assert "traceparent" not in seen[0].headers


async def test_a_call_to_another_service_carries_the_trace_on(spans: InMemorySpanExporter) -> None:
    seen: list[httpx.Request] = []
    client = recording_client(seen)
    with tracing.tracer(__name__).start_as_current_span("retrieve") as span:
        await client.post("/v1/search", {"query": "q"})
        await client.post("/v1/search", {"query": "q"}, idempotent=True)
    context = span.get_span_context()
    # The callee's server span is a child of the caller's stage span: no client span between them (the stage
    # span already holds the call), so one question makes fewer spans and the call costs little more.
    for request in seen:
        _, trace_id, parent_id, _ = request.headers["traceparent"].split("-")
        assert (trace_id, parent_id) == (format(context.trace_id, "032x"), format(context.span_id, "016x"))
    assert [(s.name, s.kind) for s in spans.get_finished_spans()] == [("retrieve", SpanKind.INTERNAL)]


async def test_a_service_joins_its_callers_trace_and_skips_probes(spans: InMemorySpanExporter) -> None:
    app = make_app()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    header = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.get("/v1/thing", headers=header)).json() == {"trace_id": trace_id}
        assert (await client.get("/healthz")).status_code == 200
    servers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [format(s.context.trace_id, "032x") for s in servers] == [trace_id]
    # One span per request, none per ASGI message (a streamed answer would make one per event).
    assert [s.name for s in spans.get_finished_spans()] == ["GET /v1/thing"]


def test_log_lines_carry_the_trace_id(spans: InMemorySpanExporter, capsys: pytest.CaptureFixture[str]) -> None:
    from services.common.logging import configure_logging

    before = structlog.get_config()
    configure_logging("info", json=True)  # writes to this test's captured stderr, closed after it
    try:
        log = structlog.get_logger("test")
        log.info("outside")
        with tracing.tracer(__name__).start_as_current_span("question") as span:
            log.info("inside")
    finally:
        structlog.configure(**before)  # the next tests log where they did before
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert "trace_id" not in lines[0]
    assert lines[1]["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert lines[1]["span_id"] == format(span.get_span_context().span_id, "016x")


def test_a_job_carries_its_traceparent_and_older_readers_ignore_it() -> None:
    value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    job = Job(messages=[{"role": "user", "content": "q"}], timeout_s=5.0, traceparent=value)
    assert Job.decode(job.encode()).traceparent == value
    # A reader that predates a field ignores it (Job ignores what it does not know): a newer writer's job reads.
    newer = {**json.loads(job.model_dump_json()), "a_field_of_tomorrow": 1}
    assert Job.decode({"job": json.dumps(newer)}).id == job.id
    # A job written without it (an older gateway, or tracing off) has none.
    older = {k: v for k, v in json.loads(job.model_dump_json()).items() if k != "traceparent"}
    assert Job.decode({"job": json.dumps(older)}).traceparent == ""


async def test_a_batch_is_a_span_linked_to_each_request_it_served(spans: InMemorySpanExporter) -> None:
    async def process(items: list[int]) -> Sequence[int]:
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(process, max_batch=8, max_wait_ms=50, span="embed_batch")
    batcher.start()
    tracer = tracing.tracer(__name__)

    async def request(n: int) -> tuple[int, int]:
        with tracer.start_as_current_span(f"request {n}") as span:
            return await batcher.submit(n), span.get_span_context().trace_id

    try:
        results = await asyncio.gather(request(1), request(2))  # both submitted before the batcher wakes
    finally:
        await batcher.stop()
    (batch,) = [s for s in spans.get_finished_spans() if s.name == "embed_batch"]
    assert batch.attributes is not None and batch.attributes["ragpod.batch.size"] == 2
    assert {link.context.trace_id for link in batch.links} == {trace_id for _, trace_id in results}
    assert batch.context.trace_id == results[0][1]  # in the trace of the first request it served


async def test_the_call_to_the_model_server_carries_the_trace_on(spans: InMemorySpanExporter) -> None:
    """The ``openai`` SDK speaks over httpx2, which the httpx hooks do not reach: its client is hooked too."""
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        answer = {"choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}
        return httpx2.Response(200, json=answer)

    settings = LlmSettings(llm_openai_url="http://model/v1", llm_model_name="m", llm_concurrency=1)
    engine = OpenAIEngine(settings, transport=httpx2.MockTransport(handler))
    request = GenerationRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0)
    with tracing.tracer(__name__).start_as_current_span("llm.generate") as span:
        await engine.generate(request)
    assert seen[0].headers["traceparent"].split("-")[1] == format(span.get_span_context().trace_id, "032x")
    assert any(s.kind == SpanKind.CLIENT for s in spans.get_finished_spans())
