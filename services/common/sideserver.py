"""A uvicorn server that runs inside a process that owns its own signals (the worker)."""

from __future__ import annotations

import contextlib
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI


class SideServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the owner of the process handles SIGTERM/SIGINT


def side_server(app: FastAPI, host: str, port: int) -> SideServer:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    return SideServer(config)
