"""One stack of real processes shared by the end-to-end tests of this folder."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from ragpod.processes import free_port
from ragpod.supervisor import Stack
from tests.fixtures.models import MODEL_CACHE


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("stack")
    ports = {name: free_port() for name in ("gateway", "embedding", "retriever", "llm")}
    stack = Stack(
        ports=ports,
        redis_port=free_port(),
        data_dir=data,
        log_dir=data / "logs",
        extra_env={
            "RAG_LLM_MODEL_CACHE_DIR": str(MODEL_CACHE),
            "RAG_LLM_MAX_NEW_TOKENS": "48",
            "RAG_UPSTREAM_TIMEOUT_SECONDS": "20",
        },
    )
    stack.start(ready_timeout=240)
    yield stack
    stack.stop()


@pytest.fixture(scope="package")
def gateway(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.ports['gateway']}", timeout=180) as client:
        yield client
