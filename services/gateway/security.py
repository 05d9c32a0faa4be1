"""The gateway's front-door checks: body size, API keys, and a rate limit shared by every replica.

- A body over ``RAG_MAX_BODY_BYTES`` is answered 413 before any of it is parsed.
- ``RAG_API_KEYS`` holds keys or ``sha256:<hex>`` digests of the ``default`` tenant, with both scopes;
  ``RAG_API_KEYS_FILE`` names keys of any tenant, each with its scopes (``services.gateway.tenants``). All are
  kept as digests only, compared in constant time, and never logged (a client is named in logs and Redis keys
  by a short digest prefix). A refusal is a 401 with ``WWW-Authenticate: Bearer``; a valid key without the
  scope a route needs is a 403 ``forbidden``. Failed authentications count against the client's
  address (``RAG_AUTH_FAILURES_PER_MINUTE``, in Redis like the rate limit): beyond them every request from
  that address is a 429 with Retry-After until the window frees, a right key included, so guessing keys
  learns nothing more.
- The rate limit is a moving window per client kept in Redis (the ``limits`` library), so every gateway
  replica counts against the same window; ``RAG_TENANT_RATE_LIMIT_PER_MINUTE`` is another window, shared by
  all the keys of a tenant. When that Redis does not answer, the limiter lets requests
  through (``RAG_RATE_LIMIT_FAIL_OPEN=true``, the default, with a warning) or answers 503 naming it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Mapping, Sequence

import structlog
from fastapi import Request
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisSentinelStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from redis.exceptions import RedisError
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import (
    Busy,
    ErrorRenderer,
    Forbidden,
    PayloadTooLarge,
    RagError,
    TooManyRequests,
    Unauthorized,
    UpstreamUnavailable,
)
from services.common.queue.connection import BoundedPool, PoolExhausted
from services.gateway.config import Settings
from services.gateway.metrics import REJECTED
from services.gateway.tenants import BOTH, DEFAULT_TENANT, Caller, KeyEntry, digest_from_hex
from services.gateway.tenants import Scope as KeyScope

log = structlog.get_logger(__name__)

DIGEST_PREFIX = "sha256:"
RATE_LIMIT_PREFIX = "rag:ratelimit"
TENANT_RATE_LIMIT_PREFIX = "rag:ratelimit-tenant"
AUTH_FAILURE_PREFIX = "rag:authfail"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ragpod"'}


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_api_keys(value: str) -> list[bytes]:
    """``RAG_API_KEYS`` as digests: plain keys are hashed here, ``sha256:<hex>`` entries taken as they are."""
    digests: list[bytes] = []
    for entry in (item.strip() for item in value.split(",")):
        if not entry:
            continue
        if entry.lower().startswith(DIGEST_PREFIX):
            raw = digest_from_hex(entry)
            if raw is None:
                raise ValueError("RAG_API_KEYS: a sha256: entry must be followed by 64 hexadecimal digits")
            digests.append(raw)
        else:
            digests.append(digest(entry))
    return digests


def presented_key(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key", "").strip()


class ApiKeys:
    """Known key digests, each with its tenant and scopes; ``identify`` names the caller by a digest prefix,
    never by the key."""

    def __init__(self, digests: list[bytes], entries: Sequence[KeyEntry] = ()) -> None:
        for index, entry in enumerate(entries):
            if entry.digest in digests:  # whose would it be? refused at start, not settled by order
                raise ValueError(f"RAG_API_KEYS_FILE: entry {index}: the same key as one in RAG_API_KEYS")
        self.entries = [KeyEntry(known, DEFAULT_TENANT, BOTH) for known in digests] + list(entries)

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def identify(self, request: Request) -> Caller:
        if not self.entries:
            return Caller(DEFAULT_TENANT, BOTH, "ip:" + (request.client.host if request.client else "unknown"))
        presented = digest(presented_key(request))
        # Compare with every known digest, so the time taken does not tell which one matched.
        matched: KeyEntry | None = None
        for entry in self.entries:
            if hmac.compare_digest(presented, entry.digest):
                matched = entry
        if matched is None:
            REJECTED.labels("unauthorized").inc()
            raise Unauthorized(
                "missing or invalid API key (Authorization: Bearer <key> or X-API-Key)", headers=CHALLENGE
            )
        return Caller(matched.tenant, matched.scopes, "key:" + presented.hex()[:16])


class RateLimiter:
    """``per_minute`` requests per client in any 60 s (a moving window), counted in Redis under ``prefix``."""

    def __init__(
        self,
        settings: Settings,
        per_minute: int | None = None,
        prefix: str = RATE_LIMIT_PREFIX,
        what: str = "requests per minute",
    ) -> None:
        self.per_minute = settings.rate_limit_per_minute if per_minute is None else per_minute
        self.what = what
        self.fail_open = settings.rate_limit_fail_open
        self.item = RateLimitItemPerMinute(self.per_minute)
        self._pool: BoundedPool | None = None
        storage: RedisStorage
        if settings.redis_sentinels:
            hosts = ",".join(item.strip() for item in settings.redis_sentinels.split(",") if item.strip())
            storage = RedisSentinelStorage(
                f"async+redis+sentinel://{hosts}/{settings.redis_sentinel_master}",
                implementation="redispy",
                key_prefix=prefix,
                wrap_exceptions=True,
                socket_connect_timeout=1.0,
                socket_timeout=2.0,
            )
        else:
            self._pool = BoundedPool.from_url(
                settings.redis_url,
                max_connections=settings.redis_max_connections,
                timeout=settings.redis_pool_timeout_seconds,
                socket_connect_timeout=1.0,
                socket_timeout=2.0,
            )
            storage = RedisStorage(
                "async+" + settings.redis_url,
                implementation="redispy",
                key_prefix=prefix,
                wrap_exceptions=True,
                connection_pool=self._pool,  # type: ignore[arg-type]
            )
        self.strategy = MovingWindowRateLimiter(storage)
        self._warned_at = 0.0
        self._clock: Callable[[], float] = time.time

    async def hit(self, identity: str) -> None:
        try:
            if await self.strategy.hit(self.item, identity):
                return
            stats = await self.strategy.get_window_stats(self.item, identity)
        except (StorageError, RedisError, OSError) as exc:
            self._unavailable(exc)
            return
        REJECTED.labels("rate_limited").inc()
        wait = max(1, math.ceil(stats.reset_time - self._clock()))
        log.info("rate_limited", client=identity, limit_per_minute=self.per_minute, retry_after=wait)
        raise TooManyRequests(
            f"rate limit of {self.per_minute} {self.what} exceeded; retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )

    async def wait_s(self, identity: str) -> int:
        """Seconds until ``identity`` is under its limit again; 0 while it is (nothing is counted)."""
        try:
            if await self.strategy.test(self.item, identity):
                return 0
            stats = await self.strategy.get_window_stats(self.item, identity)
        except (StorageError, RedisError, OSError) as exc:
            self._unavailable(exc)
            return 0
        return max(1, math.ceil(stats.reset_time - self._clock()))

    async def count(self, identity: str) -> None:
        """One more for ``identity``, whether or not it is over."""
        try:
            await self.strategy.hit(self.item, identity)
        except (StorageError, RedisError, OSError) as exc:
            self._unavailable(exc)

    def _unavailable(self, exc: BaseException) -> None:
        cause = getattr(exc, "storage_error", None) or exc
        if isinstance(cause, PoolExhausted):  # every connection in use: load, not an outage
            REJECTED.labels("busy").inc()
            raise Busy(f"the gateway is busy ({cause}); retry later", headers={"Retry-After": "1"}) from exc
        error = type(cause).__name__
        if not self.fail_open:
            REJECTED.labels("rate_limiter_unavailable").inc()
            raise UpstreamUnavailable("the rate limiter's store (redis) is unavailable") from exc
        now = time.monotonic()
        if now - self._warned_at > 10.0:  # one warning per 10 s of outage, not one per request
            self._warned_at = now
            log.warning("rate_limit_unavailable_fail_open", error=error)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()


class Guard:
    """Authenticates the caller, then counts the request against the caller's rate limit and its tenant's.

    With keys on, an address over ``RAG_AUTH_FAILURES_PER_MINUTE`` failed authentications is refused (429)
    before its key is looked at; each failure counts against it."""

    def __init__(self, settings: Settings) -> None:
        self.keys = ApiKeys(parse_api_keys(settings.api_keys), settings.key_entries)
        self.limiter = RateLimiter(settings) if settings.rate_limit_per_minute else None
        self.tenant_limiter = (
            RateLimiter(
                settings,
                settings.tenant_rate_limit_per_minute,
                TENANT_RATE_LIMIT_PREFIX,
                "requests per minute for this tenant (RAG_TENANT_RATE_LIMIT_PER_MINUTE)",
            )
            if settings.tenant_rate_limit_per_minute
            else None
        )
        self.failures = (
            RateLimiter(settings, settings.auth_failures_per_minute, AUTH_FAILURE_PREFIX)
            if self.keys.enabled and settings.auth_failures_per_minute
            else None
        )

    async def check(self, request: Request) -> Caller:
        address = "ip:" + (request.client.host if request.client else "unknown")
        if self.failures is not None:
            wait = await self.failures.wait_s(address)
            if wait:
                REJECTED.labels("auth_failures").inc()
                log.info("auth_failures_limited", client=address, retry_after=wait)
                raise TooManyRequests(
                    f"more than {self.failures.per_minute} failed authentications per minute from this address; "
                    f"retry in {wait} s",
                    headers={"Retry-After": str(wait)},
                )
        try:
            caller = self.keys.identify(request)
        except Unauthorized:
            if self.failures is not None:
                await self.failures.count(address)
            raise
        if self.limiter is not None:
            await self.limiter.hit(caller.identity)
        if self.tenant_limiter is not None:
            await self.tenant_limiter.hit("tenant:" + caller.tenant)
        return caller

    async def aclose(self) -> None:
        for limiter in (self.limiter, self.tenant_limiter, self.failures):
            if limiter is not None:
                await limiter.aclose()


def require(caller: Caller, scope: KeyScope) -> None:
    """403 ``forbidden`` unless the caller's key has ``scope``."""
    if scope not in caller.scopes:
        REJECTED.labels("forbidden").inc()
        log.info("forbidden", client=caller.identity, tenant=caller.tenant, scope=scope)
        raise Forbidden(f"this API key lacks the {scope!r} scope (its scopes: {', '.join(sorted(caller.scopes))})")


class BodyLimitMiddleware:
    """Answers 413 to a body over ``max_bytes`` before the application reads any of it.

    A declared ``Content-Length`` over the limit is refused at once; a body without one (chunked) is
    read up to the limit first and handed on only when it fits, so no handler sees part of it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, shapes: Mapping[str, ErrorRenderer] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.shapes = dict(shapes or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if length >= 0:  # the server stops a body at its declared length
                await self.app(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        REJECTED.labels("body_too_large").inc()
        error = PayloadTooLarge(f"request body larger than {self.max_bytes} bytes (RAG_MAX_BODY_BYTES)")
        path = str(scope.get("path", ""))
        renderer = next((r for prefix, r in self.shapes.items() if path.startswith(prefix)), None)
        response: Response = (
            renderer(error, {})
            if renderer is not None
            else JSONResponse({"error": error.error, "detail": error.detail}, status_code=error.status_code)
        )
        await response(scope, receive, send)


class ConcurrencyLimitMiddleware:
    """At most ``limit`` requests in this process at once (a streamed answer counts until its end); beyond it a
    503 ``busy`` with Retry-After at once. ``/healthz``, ``/readyz`` and ``/metrics`` are neither counted nor
    refused: a loaded process is not a dead or unready one. (uvicorn's own ``limit_concurrency`` answers in
    plain text and counts the probes.) Given ``only`` (method and path pairs), it counts and refuses those
    requests alone, as the bound on uploads: their bodies are spooled to /tmp before a handler runs."""

    EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        shapes: Mapping[str, ErrorRenderer] | None = None,
        *,
        only: frozenset[tuple[str, str]] | None = None,
        what: str = "requests",
        setting: str = "RAG_MAX_CONCURRENT_REQUESTS",
    ) -> None:
        self.app = app
        self.limit = limit
        self.shapes = dict(shapes or {})
        self.only = only
        self.what = what
        self.setting = setting
        self.in_flight = 0

    def _counts(self, scope: Scope) -> bool:
        if scope["type"] != "http":
            return False
        if self.only is not None:
            return (scope.get("method", ""), scope.get("path", "")) in self.only
        return scope.get("path") not in self.EXEMPT

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._counts(scope):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            REJECTED.labels("busy").inc()
            error = Busy(
                f"the gateway is serving its limit of {self.limit} {self.what} ({self.setting}); retry later",
                headers={"Retry-After": "1"},
            )
            await _render(error, scope, self.shapes)(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def _render(error: RagError, scope: Scope, shapes: Mapping[str, ErrorRenderer]) -> Response:
    """``error`` in the shape of the route asked for (OpenAI's under its prefixes), else the usual one."""
    path = str(scope.get("path", ""))
    renderer = next((r for prefix, r in shapes.items() if path.startswith(prefix)), None)
    if renderer is not None:
        return renderer(error, {})
    return JSONResponse(
        {"error": error.error, "detail": error.detail}, status_code=error.status_code, headers=error.headers
    )
