"""An in-process gateway on a real Redis, with a worker (scripted engine), a stand-in retriever and a stand-in
embedding service (the real model behind it)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.embedding.model import Embedder
from services.gateway.app import create_app
from services.gateway.config import Settings
from services.llm.config import Settings as LlmSettings
from services.llm.worker import Worker
from tests.fixtures.apps import in_process
from tests.fixtures.embedding import EmbeddingDouble
from tests.fixtures.engines import ScriptedEngine
from tests.fixtures.llm import wait_for
from tests.fixtures.redis import RedisServer

HITS = [
    {"document_id": "zorblax", "chunk": 0, "score": 0.9, "text": "The Zorblax was first sold in 1987.", "metadata": {}},
    {"document_id": "other", "chunk": 2, "score": 0.4, "text": "Unrelated.", "metadata": {"k": "v"}},
]


@dataclass
class RetrieverDouble:
    """Search answers ``hits``; documents are counted; the status report is all ok."""

    requests: list[httpx.Request] = field(default_factory=list)
    hits: list[dict[str, Any]] = field(default_factory=lambda: list(HITS))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/v1/search":
            top_k = json.loads(request.content)["top_k"]
            return httpx.Response(200, json={"hits": self.hits[:top_k], "embed_ms": 3.0, "search_ms": 2.0})
        if request.url.path == "/v1/documents":
            docs = json.loads(request.content)["documents"]
            return httpx.Response(200, json={"indexed": len(docs), "chunks": len(docs)})
        if request.url.path == "/v1/status":
            checks = {"retriever": "ok", "qdrant": "ok"}
            return httpx.Response(200, json={"status": "ok", "service": "retriever", "checks": checks})
        return httpx.Response(404, json={"error": "not_found", "detail": "no such route"})


@dataclass
class Gateway:
    client: httpx.AsyncClient
    retriever: RetrieverDouble
    embedding: EmbeddingDouble
    engine: ScriptedEngine
    redis: Redis


@pytest.fixture
async def gateway(redis_server: RedisServer, redis_client: Redis, embedder: Embedder) -> AsyncIterator[Gateway]:
    settings = Settings(redis_url=redis_server.url, top_k_max=10, max_question_chars=300, max_documents_per_request=3)
    retriever = RetrieverDouble()
    embedding = EmbeddingDouble(embedder.encode)
    engine = ScriptedEngine()
    app = create_app(
        settings, retriever_transport=httpx.MockTransport(retriever), embedding_transport=embedding.transport()
    )
    async with in_process(app, base_url="http://gateway") as client:
        worker_redis = Redis.from_url(redis_server.url, decode_responses=True)
        worker = Worker(
            LlmSettings(redis_url=redis_server.url, llm_read_block_ms=100), engine, worker_redis, name="test-worker"
        )
        task = asyncio.create_task(worker.run())
        await wait_for(lambda: _has_live_worker(worker))  # its first heartbeat: /v1/status counts it
        yield Gateway(client, retriever, embedding, engine, redis_client)
        worker.request_stop()
        await asyncio.wait_for(task, 10)
        await worker_redis.aclose()


async def _has_live_worker(worker: Worker) -> bool:
    return await worker.queue.live_workers() > 0


def body(response: httpx.Response) -> Any:
    return response.json()
