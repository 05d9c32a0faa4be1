"""Optional API keys and a per-client rate limit (both off by default)."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field

from fastapi import Request

from services.common.errors import TooManyRequests, Unauthorized
from services.gateway.config import Settings
from services.gateway.metrics import REJECTED


def _presented_key(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key", "").strip()


@dataclass
class _Bucket:
    tokens: float
    updated: float = field(default_factory=time.monotonic)


class Guard:
    """Checks the API key and takes one token from the client's bucket (per gateway pod)."""

    def __init__(self, settings: Settings) -> None:
        self.keys = [k.strip() for k in settings.api_keys.split(",") if k.strip()]
        self.per_minute = settings.rate_limit_per_minute
        self._buckets: dict[str, _Bucket] = {}

    def check(self, request: Request) -> None:
        client = request.client.host if request.client else "unknown"
        if self.keys:
            key = _presented_key(request)
            if not key or not any(hmac.compare_digest(key, k) for k in self.keys):
                REJECTED.labels("unauthorized").inc()
                raise Unauthorized("missing or invalid API key (Authorization: Bearer <key> or X-API-Key)")
            client = key
        if self.per_minute:
            self._take(client)

    def _take(self, client: str) -> None:
        now = time.monotonic()
        bucket = self._buckets.get(client) or _Bucket(tokens=float(self.per_minute))
        bucket.tokens = min(float(self.per_minute), bucket.tokens + (now - bucket.updated) * self.per_minute / 60.0)
        bucket.updated = now
        if bucket.tokens < 1.0:
            REJECTED.labels("rate_limited").inc()
            wait = int((1.0 - bucket.tokens) * 60.0 / self.per_minute) + 1
            raise TooManyRequests(
                f"rate limit of {self.per_minute} requests per minute", headers={"Retry-After": str(wait)}
            )
        bucket.tokens -= 1.0
        self._buckets[client] = bucket
        if len(self._buckets) > 10_000:  # forget idle clients
            cutoff = now - 120
            self._buckets = {k: b for k, b in self._buckets.items() if b.updated > cutoff}
