"""Two tenants on the real stack: the gateway with a keys file, the real retriever over each store backend (Qdrant
Edge on a temporary path; the server backend through qdrant-client's local mode, where the tenant index is a
no-op but the filter is not), the real embedding model, a real Redis and a worker. Every route from each key:
nothing of one tenant is read, written or deleted through the other's key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from qdrant_client import AsyncQdrantClient
from redis.asyncio import Redis

from services.embedding.model import Embedder
from services.gateway.app import create_app as create_gateway
from services.gateway.config import Settings as GatewaySettings
from services.llm.config import Settings as LlmSettings
from services.llm.worker import Worker
from services.retriever.app import create_app as create_retriever
from services.retriever.config import Settings as RetrieverSettings
from services.retriever.store import EdgeStore, ServerStore, VectorStore
from tests.fixtures.apps import in_process
from tests.fixtures.engines import ScriptedEngine
from tests.fixtures.gateway_stack import embedding_transport, forwarding_transport
from tests.fixtures.redis import RedisServer

pytestmark = pytest.mark.slow

KEYS = """
- {key: key-a, tenant: team-a, scopes: [read, write]}
- {key: key-b, tenant: team-b, scopes: [read, write]}
- {key: key-b-read, tenant: team-b, scopes: [read]}
"""
SECRET = "Team B salaries, secret: Alice earns 99000 euros a year and Bob earns 87000 euros."
A_DOCS = {
    "shared/notes.md": "Team A notes: the salaries review of team A happens in March.",
    "a/handbook.md": "Team A handbook: vacation is 27 days a year.",
}
B_DOCS = {"shared/notes.md": "Team B notes: the salary bands are reviewed yearly.", "team-b/secret-salaries.md": SECRET}
QUESTION = "What are the salaries of Alice and Bob in team B?"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Stack:
    gateway: httpx.AsyncClient

    async def call(self, key: str, method: str, path: str, **options: Any) -> httpx.Response:
        return await self.gateway.request(method, path, headers=bearer(key), **options)


def open_store(backend: str, path: Path) -> VectorStore:
    if backend == "edge":
        return EdgeStore(path / "edge", "chunks")
    return ServerStore(AsyncQdrantClient(location=":memory:"), "chunks")


@pytest.fixture(params=["edge", "server"])
async def stack(
    request: pytest.FixtureRequest, tmp_path: Path, embedder: Embedder, redis_server: RedisServer, redis_client: Redis
) -> AsyncIterator[Stack]:
    keys = tmp_path / "keys.yaml"
    keys.write_text(KEYS)
    store = open_store(str(request.param), tmp_path)
    settings = RetrieverSettings(chunk_size=300, chunk_overlap=40)
    retriever_app = create_retriever(settings, embedding_transport=embedding_transport(embedder), store=store)
    try:
        async with in_process(retriever_app, base_url="http://retriever") as retriever:
            # No floors, before generation or after it: every answer carries the sources retrieval gave the model.
            gateway_settings = GatewaySettings(
                redis_url=redis_server.url,
                api_keys_file=str(keys),
                min_relevance=0.0,
                min_question_support=0.0,
                max_queue_depth=1000,
            )
            gateway_app = create_gateway(
                gateway_settings,
                retriever_transport=forwarding_transport(retriever, []),
                embedding_transport=embedding_transport(embedder),
            )
            async with in_process(gateway_app, base_url="http://gateway") as gateway:
                worker_redis = Redis.from_url(redis_server.url, decode_responses=True)
                worker = Worker(
                    LlmSettings(redis_url=redis_server.url, llm_read_block_ms=100),
                    ScriptedEngine(),
                    worker_redis,
                    name="tenants-worker",
                )
                task = asyncio.create_task(worker.run())
                try:
                    yield Stack(gateway)
                finally:
                    worker.request_stop()
                    await asyncio.wait_for(task, 10)
                    await worker_redis.aclose()
    finally:
        await store.close()


async def fill(stack: Stack) -> None:
    """Team A by JSON documents, team B by file upload: the same id in both, and B's secret."""
    documents = {"documents": [{"id": i, "text": t} for i, t in A_DOCS.items()]}
    assert (await stack.call("key-a", "POST", "/v1/documents", json=documents)).status_code == 200
    files = [("files", (name.rsplit("/", 1)[-1], text.encode(), "text/markdown")) for name, text in B_DOCS.items()]
    ids = {"id": list(B_DOCS)}
    uploaded = await stack.call("key-b", "POST", "/v1/files", files=files, data=ids)
    assert uploaded.status_code == 200, uploaded.text


def texts_of(sources: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(source["document_id"], source["text"]) for source in sources}


@pytest.mark.parametrize(("key", "own", "other"), [("key-a", A_DOCS, B_DOCS), ("key-b", B_DOCS, A_DOCS)])
async def test_every_read_route_sees_only_the_key_s_tenant(
    stack: Stack, key: str, own: dict[str, str], other: dict[str, str]
) -> None:
    await fill(stack)
    mine = set(own.items())
    search = await stack.call(key, "POST", "/v1/search", json={"question": QUESTION, "top_k": 5})
    assert texts_of(search.json()["sources"]) == mine
    ask = await stack.call(key, "POST", "/v1/ask", json={"question": QUESTION, "top_k": 5})
    assert ask.status_code == 200, ask.text
    assert texts_of(ask.json()["sources"]) == mine
    messages = [{"role": "user", "content": QUESTION}]
    chat = await stack.call(key, "POST", "/v1/chat/completions", json={"model": "ragpod", "messages": messages})
    assert chat.status_code == 200, chat.text
    assert texts_of(chat.json()["ragpod"]["sources"]) == mine
    listed = await stack.call(key, "GET", "/v1/documents")
    assert sorted(d["id"] for d in listed.json()["documents"]) == sorted(own)
    shared = await stack.call(key, "GET", "/v1/documents/shared/notes.md")
    assert shared.status_code == 200
    assert ("filename" in shared.json()["metadata"]) == (key == "key-b")  # B's came as a file, A's did not
    for document_id in set(other) - set(own):
        assert (await stack.call(key, "GET", f"/v1/documents/{document_id}")).status_code == 404


async def test_no_key_deletes_or_overwrites_the_other_tenant_s_documents(stack: Stack) -> None:
    await fill(stack)
    assert (await stack.call("key-a", "DELETE", "/v1/documents/team-b/secret-salaries.md")).status_code == 404
    assert (await stack.call("key-b", "DELETE", "/v1/documents/a/handbook.md")).status_code == 404
    bulk = await stack.call("key-a", "POST", "/v1/documents/delete", json={"prefix": "team-b/"})
    assert bulk.json() == {"deleted": 0}
    assert (await stack.call("key-a", "DELETE", "/v1/documents/shared/notes.md")).status_code == 204
    # A writes the same id again, shorter: B's document of that id keeps its text.
    again = {"documents": [{"id": "shared/notes.md", "text": "A again."}]}
    assert (await stack.call("key-a", "POST", "/v1/documents", json=again)).status_code == 200
    found = await stack.call("key-b", "POST", "/v1/search", json={"question": QUESTION, "top_k": 5})
    assert texts_of(found.json()["sources"]) == set(B_DOCS.items())
    emptied = await stack.call("key-b", "POST", "/v1/documents/delete", json={"prefix": "shared/"})
    assert emptied.json() == {"deleted": 1}
    listed = await stack.call("key-a", "GET", "/v1/documents")
    assert sorted(d["id"] for d in listed.json()["documents"]) == ["a/handbook.md", "shared/notes.md"]


async def test_a_read_only_key_reads_its_tenant_and_cannot_ingest_or_delete(stack: Stack) -> None:
    await fill(stack)
    found = await stack.call("key-b-read", "POST", "/v1/search", json={"question": QUESTION, "top_k": 5})
    assert texts_of(found.json()["sources"]) == set(B_DOCS.items())
    refused = [
        await stack.call("key-b-read", "POST", "/v1/documents", json={"documents": [{"id": "x", "text": "x"}]}),
        await stack.call("key-b-read", "POST", "/v1/files", files=[("files", ("x.md", b"x", "text/markdown"))]),
        await stack.call("key-b-read", "DELETE", "/v1/documents/team-b/secret-salaries.md"),
        await stack.call("key-b-read", "POST", "/v1/documents/delete", json={"prefix": "team-b/"}),
    ]
    assert [(r.status_code, r.json()["error"]) for r in refused] == [(403, "forbidden")] * 4
    listed = await stack.call("key-b", "GET", "/v1/documents")
    assert sorted(d["id"] for d in listed.json()["documents"]) == sorted(B_DOCS)
