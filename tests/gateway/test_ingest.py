"""Indexing large documents: the gateway waits as long as the work it sent, and a caller that goes away
stops the work down the line (the retriever's indexing and its embedding calls)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from services.gateway.app import create_app as create_gateway
from services.gateway.config import Settings
from services.retriever.app import create_app as create_retriever
from services.retriever.config import Settings as RetrieverSettings
from tests.fixtures.apps import in_process
from tests.fixtures.llm import wait_for
from tests.fixtures.redis import RedisServer
from tests.fixtures.uvicorn_server import serving


def slow_retriever(seconds: float) -> FastAPI:
    """A stand-in retriever that indexes anything, taking ``seconds`` per request."""
    app = FastAPI()

    @app.post("/v1/documents")
    async def index(body: dict[str, Any]) -> dict[str, int]:
        await asyncio.sleep(seconds)
        return {"indexed": len(body["documents"]), "chunks": 10 * len(body["documents"])}

    return app


async def test_the_wait_for_the_retriever_grows_with_the_text_sent(redis_server: RedisServer) -> None:
    # The retriever takes 1.5 s: longer than RAG_UPSTREAM_TIMEOUT_SECONDS, shorter than the work's deadline.
    async with serving(slow_retriever(1.5)) as retriever_url:
        settings = Settings(
            redis_url=redis_server.url,
            retriever_url=retriever_url,
            upstream_timeout_seconds=0.5,
            ingest_chars_per_second=1000,
        )
        async with in_process(create_gateway(settings)) as client:
            large = await client.post("/v1/documents", json={"documents": [{"id": "big", "text": "word " * 2000}]})
            files = await client.post("/v1/files", files={"files": ("big.txt", b"word " * 2000)})
            small = await client.post("/v1/documents", json={"documents": [{"id": "small", "text": "word"}]})
    # 10,000 characters: 0.5 + 10,000 / 1,000 = 10.5 s for the retriever to answer (it takes 1.5 s).
    assert large.status_code == 200, large.text
    assert files.status_code == 200, files.text
    # A few characters get RAG_UPSTREAM_TIMEOUT_SECONDS, and a retriever slower than that is a 504.
    assert small.status_code == 504 and small.json()["error"] == "upstream_timeout"


async def test_a_caller_that_goes_away_stops_the_indexing_and_its_embedding_calls(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    embed_calls = 0

    async def slow_embedding(request: httpx.Request) -> httpx.Response:
        nonlocal embed_calls
        if request.method == "GET":
            return httpx.Response(200, json={"status": "ok", "service": "embedding", "checks": {}})
        embed_calls += 1
        await asyncio.sleep(0.3)
        texts = json.loads(request.content)["texts"]
        body = {"vectors": [[1.0] + [0.0] * 7 for _ in texts], "model": "m", "dimension": 8, "device": "cpu"}
        return httpx.Response(200, json=body)

    retriever = create_retriever(
        RetrieverSettings(
            qdrant_path=str(tmp_path / "qdrant"), chunk_size=100, chunk_overlap=10, embed_batch_size=1,
            embed_concurrency=1,
        ),
        embedding_transport=httpx.MockTransport(slow_embedding),
    )  # fmt: skip
    text = " ".join(f"Sentence number {i} of a long document." for i in range(120))  # about 50 chunks
    async with serving(retriever) as retriever_url:
        gateway = create_gateway(Settings(redis_url=redis_server.url, retriever_url=retriever_url))
        async with serving(gateway) as gateway_url, httpx.AsyncClient(base_url=gateway_url, timeout=60) as client:
            ingest = asyncio.create_task(
                client.post("/v1/documents", json={"documents": [{"id": "long", "text": text}]})
            )
            await wait_for(lambda: _at_least(embed_calls, 2), within=30)
            ingest.cancel()  # the caller gives up: its connection to the gateway closes
            await asyncio.gather(ingest, return_exceptions=True)
            at_cancel = embed_calls
            await asyncio.sleep(2.0)  # about six more embedding calls, if the indexing went on
            after = embed_calls
        async with httpx.AsyncClient(base_url=retriever_url) as direct:
            stored = await direct.get("/v1/documents/long")
    assert after <= at_cancel + 1, (at_cancel, after)  # the call in flight may end; no new one starts
    assert stored.status_code == 404  # nothing half-written either


async def _at_least(value: int, least: int) -> bool:
    return value >= least
