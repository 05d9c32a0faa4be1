"""Calls between services: httpx's own transport, one rule for resending, and every failure a RagError."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, TypeVar, overload

import httpx
import structlog
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from services.common import tracing
from services.common.errors import BY_STATUS, BadRequest, RagError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from services.common.logging import REQUEST_ID_HEADER

log = structlog.get_logger(__name__)
M = TypeVar("M", bound=BaseModel)

# Idempotent by HTTP's own definition (RFC 9110, 9.2.2): sending one of these twice does what sending it once
# does. A POST is idempotent only when its caller says so (``idempotent=True``).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
# The connection failed after the request may have reached the server and before its whole answer came back:
# a pooled keep-alive connection the server closed just as it was reused, or a reset. Sent once more only when
# the request is idempotent. A refused connection (``httpx.ConnectError``) is not resent: the service is down
# and the caller hears so at once. A timeout is not resent either: the caller's deadline is spent.
_RESENDABLE = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
# Idle connections are closed before uvicorn's own keep-alive (5 s) would close them from the server's side.
KEEPALIVE_EXPIRY_SECONDS = 4.0
# Connecting includes looking the service's name up. A resolver asks again 5 s after a query that got no answer
# (glibc's default ``timeout:5``; a DNS reply lost in conntrack on Kubernetes, or podman's DNS while containers
# start), so a limit of 5 s turned one lost packet into a failed call: the limit leaves room for that second ask.
CONNECT_TIMEOUT_SECONDS = 10.0


class ServiceClient:
    """A JSON client for one other service, named in every error it raises.

    ``get`` and ``post`` fail alike: a refused connection is ``UpstreamUnavailable``,
    no answer in time ``UpstreamTimeout``, an error status is carried on
    (``translate``), and an answer that is not the JSON expected is ``UpstreamError``.

    The wire is httpx's own transport, connections pooled and kept alive. A
    request whose connection failed before any answer came back is sent once
    more on a new connection only when it is idempotent: ``GET``, ``HEAD``,
    ``PUT``, ``DELETE`` and ``OPTIONS`` are; a ``POST`` is when its caller passes
    ``idempotent=True`` (an embedding, a search, an upsert under deterministic
    ids), and is sent only once otherwise. Error statuses are never resent here.
    """

    def __init__(self, name: str, base_url: str, timeout: float, transport: httpx.AsyncBaseTransport | None = None):
        self.name = name
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_SECONDS)),
            transport=transport
            if transport is not None
            else httpx.AsyncHTTPTransport(
                limits=httpx.Limits(
                    max_connections=100, max_keepalive_connections=100, keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS
                )
            ),
        )
        tracing.instrument_client(self._client)  # a client span and the caller's traceparent, when tracing is on
        self.headers: dict[str, str] = {}

    def with_headers(self, headers: Mapping[str, str]) -> ServiceClient:
        """This client, sending ``headers`` with every call too: same connections, nothing of its own to close."""
        scoped = copy.copy(self)
        scoped.headers = {**self.headers, **headers}
        return scoped

    @overload
    async def get(self, path: str, *, request_id: str | None = ..., params: dict[str, Any] | None = ...) -> Any: ...
    @overload
    async def get(
        self, path: str, *, request_id: str | None = ..., params: dict[str, Any] | None = ..., model: type[M]
    ) -> M: ...
    async def get(
        self,
        path: str,
        *,
        request_id: str | None = None,
        params: dict[str, Any] | None = None,
        model: type[BaseModel] | None = None,
    ) -> Any:
        return await self.request("GET", path, request_id=request_id, params=params, model=model)

    @overload
    async def post(
        self,
        path: str,
        payload: Any,
        *,
        idempotent: bool = ...,
        request_id: str | None = ...,
        time_limit: float | None = ...,
    ) -> Any: ...
    @overload
    async def post(
        self,
        path: str,
        payload: Any,
        *,
        idempotent: bool = ...,
        request_id: str | None = ...,
        time_limit: float | None = ...,
        model: type[M],
    ) -> M: ...
    async def post(
        self,
        path: str,
        payload: Any,
        *,
        idempotent: bool = False,
        request_id: str | None = None,
        time_limit: float | None = None,
        model: type[BaseModel] | None = None,
    ) -> Any:
        """``idempotent``: sending this POST twice does what sending it once does, so a failed connection may
        send it again (see the class). ``time_limit``: this call's timeout, instead of the client's."""
        return await self.request(
            "POST", path, json=payload, request_id=request_id, model=model, idempotent=idempotent, time_limit=time_limit
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        request_id: str | None = None,
        model: type[BaseModel] | None = None,
        idempotent: bool = False,
        time_limit: float | None = None,
    ) -> Any:
        """One call; the decoded JSON body (validated into ``model`` when given), or ``None`` for a 204.

        ``idempotent`` marks a request of another method (a POST) as safe to send twice; the methods in
        ``IDEMPOTENT_METHODS`` are so without it. ``time_limit``, when given, replaces the client's for this
        call (work that grows with what is sent)."""
        headers = {**self.headers, REQUEST_ID_HEADER: request_id} if request_id else dict(self.headers)
        resend = idempotent or method.upper() in IDEMPOTENT_METHODS
        options: dict[str, Any] = {"json": json, "params": params, "headers": headers}
        if time_limit is not None:
            options["timeout"] = httpx.Timeout(time_limit, connect=min(time_limit, CONNECT_TIMEOUT_SECONDS))
        try:
            response = await self._send(method, path, resend, **options)
        except httpx.TimeoutException as exc:
            log.warning("upstream_timeout", upstream=self.name, path=path)
            raise UpstreamTimeout(f"{self.name} did not answer in time") from exc
        except httpx.TransportError as exc:
            log.warning("upstream_unreachable", upstream=self.name, path=path, error=type(exc).__name__)
            raise UpstreamUnavailable(f"{self.name} is unavailable") from exc
        if response.status_code >= 400:
            raise translate(self.name, response)
        if response.status_code == 204 or not response.content:
            return None
        try:
            # Parsed by pydantic's own JSON parser, straight into the model, without json.loads in between.
            if model is not None:
                return model.model_validate_json(response.content)
            return from_json(response.content)
        except (ValueError, ValidationError) as exc:
            log.warning("upstream_bad_answer", upstream=self.name, path=path, error=type(exc).__name__)
            raise UpstreamError(f"{self.name} answered {path} with something other than the JSON expected") from exc

    async def _send(self, method: str, path: str, resend: bool, **options: Any) -> httpx.Response:
        """The request, sent once more after a failed connection when ``resend`` (it is idempotent)."""
        try:
            return await self._client.request(method, path, **options)
        except _RESENDABLE as exc:
            if not resend:
                raise
            log.info("upstream_resent", upstream=self.name, path=path, error=type(exc).__name__)
        return await self._client.request(method, path, **options)

    async def aclose(self) -> None:
        await self._client.aclose()


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("detail", "")) if isinstance(body, dict) else ""


def translate(name: str, response: httpx.Response) -> RagError:
    """Carry a downstream error on: a client error keeps its status and detail, a server error names the service.

    The status answered stays on the error as ``upstream_status``."""
    error = _translate(name, response)
    error.upstream_status = response.status_code
    return error


def _translate(name: str, response: httpx.Response) -> RagError:
    status, detail = response.status_code, _detail(response)
    if status in (502, 503):
        retry_after = response.headers.get("retry-after")
        return UpstreamUnavailable(
            f"{name} is unavailable: {detail}" if detail else f"{name} is unavailable",
            headers={"Retry-After": retry_after} if retry_after else None,
        )
    if status == 504:
        return UpstreamTimeout(f"{name} timed out: {detail}" if detail else f"{name} timed out")
    if status >= 500:
        return UpstreamError(f"{name} failed: {detail}" if detail else f"{name} answered {status}")
    return BY_STATUS.get(status, BadRequest)(detail or f"{name} answered {status}")
