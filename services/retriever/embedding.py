"""The retriever's client of the embedding service: the GPU one first, the CPU one when it cannot answer.

A 503 (saturated or down), a timeout or a refused connection from the first
service sends the same texts to ``RAG_EMBEDDING_CPU_URL``, counted in
``rag_embedding_spill_total``. After a timeout or a refused connection the
next calls go straight to the CPU service for a short cooldown, so a dead
GPU service does not cost every request a timeout; then the GPU service is
tried again and takes the traffic back as soon as it answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from services.common.errors import RagError, UpstreamTimeout, UpstreamUnavailable
from services.common.http import ServiceClient
from services.retriever.config import Settings
from services.retriever.metrics import EMBEDDING_SPILL

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Embedded:
    vectors: list[list[float]]
    dimension: int
    model: str


class EmbeddingClient:
    def __init__(
        self,
        primary: ServiceClient,
        fallback: ServiceClient | None = None,
        cooldown_seconds: float = 5.0,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self._cooldown = cooldown_seconds
        self._skip_until = 0.0

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        transport: httpx.AsyncBaseTransport | None = None,
        cpu_transport: httpx.AsyncBaseTransport | None = None,
    ) -> EmbeddingClient:
        timeout = settings.upstream_timeout_seconds
        primary = ServiceClient("embedding", settings.embedding_url, timeout, transport=transport)
        fallback = None
        if settings.embedding_cpu_url or cpu_transport is not None:
            fallback = ServiceClient(
                "embedding-cpu", settings.embedding_cpu_url or "http://embedding-cpu", timeout, transport=cpu_transport
            )
        return cls(primary, fallback, settings.embedding_spill_cooldown_seconds)

    async def embed(self, texts: list[str], request_id: str = "") -> Embedded:
        """Vectors for ``texts`` in order."""
        body = await self._post({"texts": texts}, request_id)
        try:
            vectors: list[list[float]] = body["vectors"]
            embedded = Embedded(vectors, int(body["dimension"]), str(body.get("model", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise UpstreamUnavailable("embedding answered with an unexpected body") from exc
        if len(vectors) != len(texts):
            raise UpstreamUnavailable("embedding answered with the wrong number of vectors")
        return embedded

    async def _post(self, payload: dict[str, Any], request_id: str) -> Any:
        if self.fallback is None:
            return await self.primary.post("/v1/embed", payload, request_id=request_id)
        if time.monotonic() < self._skip_until:
            EMBEDDING_SPILL.labels("cooldown").inc()
            return await self.fallback.post("/v1/embed", payload, request_id=request_id)
        try:
            return await self.primary.post("/v1/embed", payload, request_id=request_id)
        except (UpstreamUnavailable, UpstreamTimeout) as exc:
            reason = _reason(exc)
            if reason != "saturated":
                self._skip_until = time.monotonic() + self._cooldown
            EMBEDDING_SPILL.labels(reason).inc()
            log.warning("embedding_spill", reason=reason, detail=exc.detail, texts=len(payload["texts"]))
            return await self.fallback.post("/v1/embed", payload, request_id=request_id)

    async def ready(self) -> str:
        """ "ok" when one of the embedding services is ready, else why not (for the status report)."""
        answers = []
        for client in (self.primary, self.fallback):
            if client is None:
                continue
            try:
                await client.get("/readyz")  # a 503 raises, naming the service and why
            except RagError as exc:
                answers.append(exc.detail)
                continue
            return "ok"
        return "; ".join(answers)

    async def aclose(self) -> None:
        await self.primary.aclose()
        if self.fallback is not None:
            await self.fallback.aclose()


def _reason(exc: RagError) -> str:
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    cause = exc.__cause__
    if isinstance(cause, httpx.TransportError):
        return "unreachable"
    return "saturated"
