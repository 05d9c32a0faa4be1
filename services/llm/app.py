"""The worker's side port: /healthz, /readyz and /metrics, beside the queue loop."""

from __future__ import annotations

from fastapi import FastAPI

from services.common.app import OK, Checks, add_common_routes
from services.llm.worker import Worker


def create_app(worker: Worker) -> FastAPI:
    """``worker`` is the loop this port reports on; it is the app's only collaborator."""
    app = FastAPI(title="ragpod llm worker", version="0.1.0")

    async def readiness() -> Checks:
        """Only this pod: its engine (in process, or the model server beside it in the pod) answers and
        the loop is not draining. Redis is a dependency: the loop reconnects on its own when it is back."""
        checks = {"engine": OK if await worker.engine.ready() else "model not loaded or server not answering"}
        if worker.stopping:
            checks["worker"] = "draining"
        return checks

    add_common_routes(app, "llm", readiness)
    return app
