"""What every service's app factory shares: middleware, error handlers, health, status and metrics routes."""

# No ``from __future__ import annotations`` here: the routes below take dependencies that are
# arguments of ``add_common_routes``, and FastAPI must see those annotations as objects, not names.

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from services.common import tracing
from services.common.errors import ErrorRenderer, RagError, UnexpectedErrorMiddleware, install_error_handlers
from services.common.logging import RequestIdMiddleware
from services.common.metrics import MetricsMiddleware, metrics_endpoint

OK = "ok"
Checks = dict[str, str]
"""One entry per part: ``"ok"`` (perhaps with a note in brackets: ``"ok (2 live)"``) or, in words, why not."""
ChecksDependency = Callable[..., Awaitable[Checks]]
"""A FastAPI dependency (it may itself take ``StateDep`` and the like) returning ``Checks``."""
Probe = Callable[[], Awaitable[object]]
"""Succeeds when the part is fine; raises (best a ``RagError`` saying why) when it is not."""


async def check(probe: Probe, *, within: float = 2.0) -> str:
    """``"ok"`` when ``probe`` finishes within ``within`` seconds, else why not: the one check helper."""
    try:
        async with asyncio.timeout(within):
            await probe()
    except RagError as exc:
        return exc.detail
    except TimeoutError:
        return f"no answer within {within:g} s"
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}"
    return OK


async def check_all(probes: Mapping[str, Probe], *, within: float = 2.0) -> Checks:
    """Every probe at once, each bounded by ``within`` seconds."""
    results = await asyncio.gather(*(check(probe, within=within) for probe in probes.values()))
    return dict(zip(probes, results, strict=True))


class StatusResponse(BaseModel):
    status: str
    service: str
    checks: Checks


def is_ok(value: str) -> bool:
    return value == OK or value.startswith(f"{OK} (")


def all_ok(checks: Mapping[str, str]) -> bool:
    return all(is_ok(value) for value in checks.values())


def _probe_answer(service: str, checks: Checks, *, failed: str) -> JSONResponse:
    """200 with the checks, or 503 in the error shape with the checks beside it."""
    if all_ok(checks):
        return JSONResponse({"status": OK, "service": service, **({"checks": checks} if checks else {})})
    detail = "; ".join(f"{name}: {value}" for name, value in checks.items() if not is_ok(value))
    return JSONResponse(
        {"error": failed, "detail": detail, "status": failed, "service": service, "checks": checks},
        status_code=503,
    )


def add_common_routes(
    app: FastAPI,
    service: str,
    readiness: ChecksDependency,
    *,
    liveness: ChecksDependency | None = None,
    status: ChecksDependency | None = None,
    status_dependencies: Sequence[Any] = (),
    status_responses: Mapping[int | str, dict[str, Any]] | None = None,
    error_shapes: Mapping[str, ErrorRenderer] | None = None,
) -> None:
    """``/healthz`` (the process is alive), ``/readyz`` (the pod can serve), ``/metrics``; ``/v1/status``.

    ``liveness``, when given, lets ``/healthz`` answer 503 when the process
    cannot recover by itself (a model that failed to load): the kubelet
    restarts it. Without it ``/healthz`` answers 200 while the process serves.

    ``readiness`` covers only what the pod itself needs (its model loaded, its
    own start finished), never another service: a dependency that is down is
    a 503 naming it on each request that needs it, so one blip cannot empty
    every Service above it. Any value other than "ok" makes ``/readyz``
    answer 503, which takes the pod out of its Service without restarting it.

    ``status``, when given, reports the whole chain below this service for
    people and scripts at ``GET /v1/status``; it always answers 200, with
    ``status`` "ok" or "degraded".
    """
    install_error_handlers(app, error_shapes)
    app.add_middleware(UnexpectedErrorMiddleware, shapes=error_shapes)  # each added one wraps those before it
    app.add_middleware(MetricsMiddleware, service=service)
    app.add_middleware(RequestIdMiddleware)
    tracing.instrument_app(app)  # outside every middleware: a server span per request, when tracing is on

    async def always_alive() -> Checks:
        return {}

    @app.get("/healthz", include_in_schema=False)
    async def healthz(checks: Annotated[Checks, Depends(liveness or always_alive)]) -> JSONResponse:
        return _probe_answer(service, checks, failed="not_alive")

    @app.get("/readyz", include_in_schema=False)
    async def readyz(checks: Annotated[Checks, Depends(readiness)]) -> JSONResponse:
        return _probe_answer(service, checks, failed="not_ready")

    if status is not None:
        status_checks = status

        async def report(checks: Annotated[Checks, Depends(status_checks)]) -> StatusResponse:
            return StatusResponse(status=OK if all_ok(checks) else "degraded", service=service, checks=checks)

        app.add_api_route(
            "/v1/status",
            report,
            methods=["GET"],
            response_model=StatusResponse,
            dependencies=list(status_dependencies),
            responses=dict(status_responses or {}),  # what status_dependencies can answer (401, 429, ...)
            summary="The state of this service and of every service it depends on",
        )

    app.add_route("/metrics", metrics_endpoint, include_in_schema=False)
