"""Both store backends, for one test suite: Qdrant Edge on a temporary path, and the server
backend through qdrant-client's local mode (the same calls a Qdrant server takes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qdrant_client import AsyncQdrantClient

from services.retriever.store import EdgeStore, ServerStore, VectorStore

BACKENDS = ["edge", "server"]


def make_store(backend: str, path: Path, collection: str = "chunks") -> VectorStore:
    if backend == "edge":
        return EdgeStore(path / "edge", collection)
    return ServerStore(AsyncQdrantClient(location=":memory:"), collection)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(backend: str, tmp_path: Path) -> AsyncIterator[VectorStore]:
    opened = make_store(backend, tmp_path)
    try:
        yield opened
    finally:
        await opened.close()
