"""What every service's app factory shares: middleware, error handlers, health and metrics routes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from services.common.errors import install_error_handlers
from services.common.logging import RequestIdMiddleware
from services.common.metrics import MetricsMiddleware, metrics_endpoint

ReadinessCheck = Callable[[FastAPI], Awaitable[dict[str, str]]]


def add_common_routes(app: FastAPI, service: str, readiness: ReadinessCheck) -> None:
    """``/healthz`` (the process answers), ``/readyz`` (dependencies answer), ``/metrics``.

    ``readiness`` returns a status per dependency: "ok" or why not. Any value
    other than "ok" makes ``/readyz`` answer 503, which takes the pod out of
    its Service without restarting it.
    """
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, service=service)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        checks = await readiness(app)
        ready = all(value == "ok" for value in checks.values())
        return JSONResponse(
            {"status": "ok" if ready else "not_ready", "service": service, "checks": checks},
            status_code=200 if ready else 503,
        )

    app.add_route("/metrics", metrics_endpoint, include_in_schema=False)
