"""The worker's side port: /healthz, /readyz and /metrics, beside the queue loop."""

from __future__ import annotations

from fastapi import FastAPI

from services.common.app import add_common_routes
from services.llm.worker import Worker


def create_app(worker: Worker) -> FastAPI:
    app = FastAPI(title="ragpod llm worker", version="0.1.0")
    app.state.worker = worker

    async def readiness(app: FastAPI) -> dict[str, str]:
        worker: Worker = app.state.worker
        checks = {"engine": "ok" if await worker.engine.ready() else "model not loaded or server not answering"}
        try:
            await worker.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"redis unavailable: {type(exc).__name__}"
        if worker.stopping:
            checks["worker"] = "draining"
        return checks

    add_common_routes(app, "llm", readiness)
    return app
