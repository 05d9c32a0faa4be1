"""A client of the embedding service: the GPU one first, the CPU one when it cannot answer.

Used by every service that embeds (the retriever for queries and documents, the gateway for
attribution). A 503 (saturated or down), a timeout or a refused connection from the first service
sends the same texts to the second, counted in ``rag_embedding_spill_total``; nothing else does: a
500 is a bug that would fail there too, and a 4xx is the caller's. After a timeout or a refused
connection the next calls go straight to the CPU service for a short cooldown, so a dead GPU service
does not cost every request a timeout; then the GPU service is tried again and takes the traffic back
as soon as it answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from services.common.errors import RagError, UpstreamUnavailable
from services.common.http import ServiceClient
from services.common.metrics import EMBEDDING_SPILL
from services.common.settings import EmbeddingSettings

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
        settings: EmbeddingSettings,
        timeout: float,
        transport: httpx.AsyncBaseTransport | None = None,
        cpu_transport: httpx.AsyncBaseTransport | None = None,
    ) -> EmbeddingClient:
        """``RAG_EMBEDDING_URL`` first, ``RAG_EMBEDDING_CPU_URL`` (when set) for the spill; ``timeout`` per call."""
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
        # An embedding is a function of its texts alone: every call here is safe to send again.
        if self.fallback is None:
            return await self.primary.post("/v1/embed", payload, idempotent=True, request_id=request_id)
        if time.monotonic() < self._skip_until:
            EMBEDDING_SPILL.labels("cooldown").inc()
            return await self.fallback.post("/v1/embed", payload, idempotent=True, request_id=request_id)
        try:
            return await self.primary.post("/v1/embed", payload, idempotent=True, request_id=request_id)
        except RagError as exc:
            reason = spill_reason(exc)
            if reason is None:
                raise
            if reason != "saturated":
                self._skip_until = time.monotonic() + self._cooldown
            EMBEDDING_SPILL.labels(reason).inc()
            log.warning("embedding_spill", reason=reason, detail=exc.detail, texts=len(payload["texts"]))
            return await self.fallback.post("/v1/embed", payload, idempotent=True, request_id=request_id)

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


def spill_reason(exc: RagError) -> str | None:
    """Why a failure of the first service sends the texts to the second: ``saturated`` (it answered 503),
    ``timeout`` (no answer in time), ``unreachable`` (the connection was refused); ``None``: no spill."""
    cause = exc.__cause__
    if isinstance(cause, httpx.TimeoutException):
        return "timeout"
    if isinstance(cause, httpx.ConnectError):
        return "unreachable"
    if exc.upstream_status == 503:
        return "saturated"
    return None
