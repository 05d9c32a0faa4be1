"""A model that failed to load fails liveness too (the kubelet restarts the pod); one still loading does not."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

from services.embedding.app import create_app
from services.embedding.config import Settings
from services.embedding.model import Embedder


def test_a_model_that_failed_to_load_fails_liveness_and_readiness(tmp_path: Path) -> None:
    settings = Settings(embedding_model=str(tmp_path), embedding_device="cpu")  # a directory with no model in it
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120  # loading fails in the background; wait until it has
        while time.monotonic() < deadline:
            alive_status = client.get("/healthz").status_code  # asked first: a failure is final
            model = client.get("/readyz").json()["checks"]["model"]
            if model != "loading":
                break
            assert alive_status == 200  # still loading (it was when liveness answered): alive
            time.sleep(0.1)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["model"].startswith("failed: ")
        alive = client.get("/healthz")
        assert alive.status_code == 503
        assert alive.json()["error"] == "not_alive" and alive.json()["detail"].startswith("model: failed: ")
        embedded = client.post("/v1/embed", json={"texts": ["x"]})
        assert embedded.status_code == 503 and "failed to load" in embedded.json()["detail"]


def test_a_loaded_model_is_alive_and_ready(embedder: Embedder) -> None:
    with TestClient(create_app(Settings(), embedder=embedder)) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get("/healthz").json() == {"status": "ok", "service": "embedding"}
        assert client.get("/readyz").json()["checks"] == {"model": "ok"}
