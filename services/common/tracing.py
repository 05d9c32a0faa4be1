"""Traces (OpenTelemetry): one trace per question, across the services and the queue.

Off by default. A process turns it on at start (``setup``) when the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set and ``OTEL_SDK_DISABLED`` is not true: the SDK's tracer
provider then exports in batches over OTLP/HTTP, named by ``OTEL_SERVICE_NAME`` (else the service's own name);
the exporter itself reads the other ``OTEL_EXPORTER_OTLP_*`` variables (headers, timeout, compression).

Off, nothing is installed: no exporter, no middleware on the apps, no hooks on the HTTP clients, and the spans the
code opens come from OpenTelemetry's no-op tracer. On, the W3C ``traceparent`` travels in HTTP headers (read by
the FastAPI instrumentation, sent by a request hook on the clients between the services and by the httpx
instrumentation on the model server's client) and inside each queued job (its ``traceparent`` field), so a worker's
spans join the trace of the question they answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, MutableMapping
from typing import Any

import httpx
from fastapi import FastAPI
from opentelemetry import context, propagate, trace
from opentelemetry.trace import Span, SpanKind, Tracer
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# What a server span is not opened for: probes and scrapes would fill a trace backend with noise.
EXCLUDED_URLS = "/healthz,/readyz,/metrics"

_enabled = False
_tracer = trace.get_tracer(__name__)  # OpenTelemetry's proxy: the SDK's tracer once ``setup`` installs it


class TracingSettings(BaseSettings):
    """The standard OpenTelemetry variables that decide whether this process exports traces, and as whom."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", extra="ignore", frozen=True)

    exporter_otlp_endpoint: str = Field("", description="OTLP/HTTP base URL of the collector; unset: tracing off.")
    exporter_otlp_traces_endpoint: str = Field("", description="OTLP/HTTP URL for traces alone (…/v1/traces).")
    service_name: str = Field("", description="The service's name in traces; unset: the service's own name.")
    sdk_disabled: bool = Field(False, description="true turns tracing off whatever else is set.")

    @property
    def enabled(self) -> bool:
        return not self.sdk_disabled and bool(self.exporter_otlp_endpoint or self.exporter_otlp_traces_endpoint)


def enabled() -> bool:
    """Whether this process exports traces (``setup`` turned them on)."""
    return _enabled


def setup(service: str, settings: TracingSettings | None = None) -> bool:
    """Installs the exporting tracer provider once per process when the settings ask for it; True if on."""
    global _enabled
    settings = settings or TracingSettings()
    if _enabled or not settings.enabled:
        return _enabled
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.service_name or service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _enabled = True
    return True


def shutdown() -> None:
    """Exports what is still buffered (a process that stops cleanly loses no span)."""
    provider = trace.get_tracer_provider()
    flush = getattr(provider, "shutdown", None)
    if _enabled and flush is not None:
        flush()


def instrument_app(app: FastAPI) -> None:
    """A server span per request, joined to the caller's ``traceparent``; nothing when tracing is off."""
    if _enabled:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        # No span per ASGI message (each SSE event of a stream would be one): the request's span is enough.
        FastAPIInstrumentor.instrument_app(app, excluded_urls=EXCLUDED_URLS, exclude_spans=["receive", "send"])


def instrument_client(client: httpx.AsyncClient) -> None:
    """The ``traceparent`` header sent on with every call between the services; nothing when tracing is off.

    No client span: the caller's stage span (``retrieve``, ``embed``, ``attribute``) wraps each call and the
    callee's server span is its child, so a client span would say again what those two say, while httpx's
    instrumentation, which makes one, costs about as much CPU as the call itself (``bench/ask.py --tracing``
    weighs tracing). The model server's client keeps httpx's client span (``instrument_httpx2_client``): a model
    server may export no span of its own."""
    if _enabled:
        client.event_hooks["request"] = [*client.event_hooks["request"], _send_trace_on]


async def _send_trace_on(request: httpx.Request) -> None:
    propagate.inject(request.headers)


def instrument_httpx2_client(client: Any) -> None:
    """The same for an ``httpx2`` client (the ``openai`` SDK's own, which the httpx hooks above do not reach)."""
    if _enabled:
        from opentelemetry.instrumentation.httpx import HTTPX2ClientInstrumentor

        HTTPX2ClientInstrumentor.instrument_client(client)


def tracer(name: str) -> Tracer:
    """The tracer of one module (OpenTelemetry's no-op tracer until ``setup`` turns tracing on)."""
    return trace.get_tracer(name)


def traceparent() -> str:
    """The current span as a W3C ``traceparent`` value; '' when there is none or tracing is off."""
    if not _enabled:
        return ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


@contextlib.contextmanager
def joined(parent: str, name: str, kind: SpanKind = SpanKind.INTERNAL) -> Iterator[Span]:
    """A span that continues the trace named by the W3C ``traceparent`` value ``parent`` (a new trace without
    one), current inside the block."""
    parent_context = propagate.extract({"traceparent": parent}) if parent else context.Context()
    with _tracer.start_as_current_span(name, context=parent_context, kind=kind) as span:
        yield span


def trace_ids(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: the current trace and span ids on every log line written inside a span."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event["trace_id"] = format(span_context.trace_id, "032x")
        event["span_id"] = format(span_context.span_id, "016x")
    return event
