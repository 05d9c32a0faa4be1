"""Runs an app factory under uvicorn: the body of every ``python -m services.<name>``."""

from __future__ import annotations

from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from services.common.logging import configure_logging
from services.common.memory import keep_freed_memory
from services.common.settings import ServiceSettings


def run(service: str, settings: ServiceSettings, factory: Callable[[], FastAPI]) -> None:
    configure_logging(settings.log_level, settings.log_json, service)
    keep_freed_memory()  # a model's batches reuse their freed memory instead of faulting it in again
    uvicorn.run(
        factory(),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    )
