"""Prometheus series shared by every service, and the HTTP middleware.

Series are declared once, at import, in the default registry; each process is
one service, so the ``service`` label tells them apart where several share a
dashboard. HTTP series are labelled by route template, never by raw path, and
skip ``/healthz``, ``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60, 120)

HTTP_REQUESTS = Counter("rag_http_requests_total", "HTTP requests handled.", ["service", "method", "route", "status"])
HTTP_LATENCY = Histogram(
    "rag_http_request_duration_seconds",
    "HTTP request latency.",
    ["service", "method", "route"],
    buckets=LATENCY_BUCKETS,
)
MODEL_INFO = Gauge(
    "rag_model_info", "The model a service runs and its device (value 1).", ["service", "model", "device"]
)
GPU_UTILIZATION = Gauge("rag_gpu_utilization_ratio", "GPU utilisation, 0..1.", ["gpu"])
GPU_MEMORY_USED = Gauge("rag_gpu_memory_used_bytes", "GPU memory in use.", ["gpu"])
GPU_MEMORY_TOTAL = Gauge("rag_gpu_memory_total_bytes", "GPU memory in all.", ["gpu"])
EMBEDDING_SPILL = Counter(
    "rag_embedding_spill_total",
    "Embedding calls sent to the CPU embedding service because the GPU one was saturated, slow or down.",
    ["reason"],
)

UNMEASURED_PATHS = frozenset({"/healthz", "/readyz", "/health", "/metrics"})


class MetricsMiddleware:
    """Counts requests and observes latency per route template.

    The labelled series are looked up once per (method, route, status) and kept: ``labels()`` checks
    and joins its values under a lock on every call, twice a request."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service
        self._counts: dict[tuple[str, str, int], Any] = {}
        self._latencies: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNMEASURED_PATHS:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the error handler answers when the app raises before starting a response

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            count = self._counts.get((method, template, status))
            if count is None:
                count = self._counts[method, template, status] = HTTP_REQUESTS.labels(
                    self.service, method, template, str(status)
                )
            latency = self._latencies.get((method, template))
            if latency is None:
                latency = self._latencies[method, template] = HTTP_LATENCY.labels(self.service, method, template)
            count.inc()
            latency.observe(time.perf_counter() - start)


async def metrics_endpoint(_: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
