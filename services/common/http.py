"""Calls between services: one place that turns transport failures into RagErrors."""

from __future__ import annotations

from typing import Any

import httpx
import structlog

from services.common.errors import RagError, UpstreamTimeout, UpstreamUnavailable
from services.common.logging import REQUEST_ID_HEADER

log = structlog.get_logger(__name__)


class ServiceClient:
    """A JSON client for one other service, named in every error it raises."""

    def __init__(self, name: str, base_url: str, timeout: float, transport: httpx.AsyncBaseTransport | None = None):
        self.name = name
        self._client = httpx.AsyncClient(
            base_url=base_url, timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)), transport=transport
        )

    async def post(self, path: str, payload: Any, *, request_id: str | None = None) -> Any:
        headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
        try:
            response = await self._client.post(path, json=payload, headers=headers)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{self.name} did not answer in time") from exc
        except httpx.TransportError as exc:
            log.warning("upstream_unreachable", upstream=self.name, error=type(exc).__name__)
            raise UpstreamUnavailable(f"{self.name} is unavailable") from exc
        if response.status_code >= 400:
            raise _translate(self.name, response)
        return response.json()

    async def get(self, path: str) -> httpx.Response:
        try:
            return await self._client.get(path)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{self.name} did not answer in time") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"{self.name} is unavailable") from exc

    async def aclose(self) -> None:
        await self._client.aclose()


def _translate(name: str, response: httpx.Response) -> RagError:
    """Carry a downstream error on, keeping its status for 4xx and naming the service for 5xx."""
    try:
        body = response.json()
        detail = str(body.get("detail", "")) if isinstance(body, dict) else ""
    except ValueError:
        detail = ""
    if response.status_code in (502, 503):
        return UpstreamUnavailable(f"{name} is unavailable: {detail}" if detail else f"{name} is unavailable")
    if response.status_code == 504:
        return UpstreamTimeout(f"{name} timed out: {detail}" if detail else f"{name} timed out")
    error = RagError(detail or f"{name} answered {response.status_code}")
    error.status_code = response.status_code if response.status_code < 500 else 502
    error.error = "upstream_error" if response.status_code >= 500 else "bad_request"
    if response.status_code == 422:
        error.error = "validation_error"
    return error
