"""Readiness follows only the gateway itself; a dependency down is a 503 per request and shows in /v1/status,
as does the absence of a live LLM worker."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
from redis.asyncio import Redis

from ragpod.processes import free_port
from ragpod.redis_server import start_redis
from services.common.app import is_ok
from services.gateway.app import STATUS_MARGIN_SECONDS, create_app
from services.gateway.config import Settings
from services.llm.config import Settings as LlmSettings
from services.llm.worker import Worker
from tests.fixtures.apps import in_process
from tests.fixtures.embedding import EmbeddingDouble
from tests.fixtures.engines import ScriptedEngine
from tests.fixtures.llm import wait_for
from tests.fixtures.redis import RedisServer
from tests.gateway.conftest import Gateway, RetrieverDouble

ASK = {"question": "When was the Zorblax first sold?", "top_k": 1}


async def test_status_reports_the_whole_chain(gateway: Gateway) -> None:
    response = await gateway.client.get("/v1/status")
    assert response.status_code == 200
    redis = response.json()["checks"]["redis"]
    assert re.fullmatch(r"ok \(memory \d+\.\d MiB, no maxmemory\)", redis), redis
    assert response.json() == {
        "status": "ok",
        "service": "gateway",
        "checks": {
            "gateway": "ok",
            "redis": redis,
            "llm_queue": "ok",
            "llm_workers": "ok (1 live)",
            "retriever": "ok",
            "embedding": "ok",
            "qdrant": "ok",
        },
    }


async def test_redis_down_keeps_the_gateway_ready_and_each_ask_is_503_naming_it(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    retriever = RetrieverDouble()
    app = create_app(
        Settings(redis_url=redis_server.url),
        retriever_transport=httpx.MockTransport(retriever),
        embedding_transport=EmbeddingDouble().transport(),
    )
    async with in_process(app) as client:
        assert (await client.get("/v1/status")).json()["checks"]["redis"].startswith("ok (memory ")
        redis_server.proc.stop()
        try:
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"] == {"gateway": "ok"}
            asked = await client.post("/v1/ask", json=ASK)
            assert asked.status_code == 503
            assert asked.json() == {"error": "upstream_unavailable", "detail": "the job queue (redis) is unavailable"}
            status = await client.get("/v1/status")
            assert status.status_code == 200
            assert status.json()["status"] == "degraded"
            checks = status.json()["checks"]
            assert checks["redis"] != "ok" and checks["llm_queue"] != "ok"
            assert checks["retriever"] == "ok"  # the rest of the chain is told apart
            assert (await client.get("/readyz")).status_code == 200
        finally:
            redis_server.restart()
        checks = (await client.get("/v1/status")).json()["checks"]
        assert is_ok(checks["redis"]) and checks["llm_queue"] == checks["retriever"] == "ok"


async def test_retriever_down_keeps_the_gateway_ready_and_each_ask_is_503_naming_it(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    app = create_app(
        Settings(redis_url=redis_server.url),
        retriever_transport=httpx.MockTransport(refused),
        embedding_transport=EmbeddingDouble().transport(),
    )
    async with in_process(app) as client:
        assert (await client.get("/readyz")).status_code == 200
        asked = await client.post("/v1/ask", json=ASK)
        assert asked.status_code == 503
        assert asked.json() == {"error": "upstream_unavailable", "detail": "retriever is unavailable"}
        checks = (await client.get("/v1/status")).json()["checks"]
        assert checks["retriever"] == "retriever is unavailable"
        assert checks["qdrant"] == "unknown: retriever is unavailable"
        assert is_ok(checks["redis"]) and checks["embedding"] == "ok"  # the gateway asks the embedding service itself


async def test_status_passes_on_what_the_retriever_reports_below_it(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    def qdrant_down(request: httpx.Request) -> httpx.Response:
        checks = {"retriever": "ok", "embedding": "ok", "qdrant": "qdrant is unavailable"}
        return httpx.Response(200, json={"status": "degraded", "service": "retriever", "checks": checks})

    app = create_app(
        Settings(redis_url=redis_server.url),
        retriever_transport=httpx.MockTransport(qdrant_down),
        embedding_transport=EmbeddingDouble().transport(),
    )
    async with in_process(app) as client:
        body = (await client.get("/v1/status")).json()
        assert body["status"] == "degraded"
        assert body["checks"]["qdrant"] == "qdrant is unavailable"
        assert body["checks"]["retriever"] == body["checks"]["embedding"] == "ok"


async def test_status_checks_the_embedding_services_itself_one_ready_is_enough(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    gpu, cpu = EmbeddingDouble(down=True), EmbeddingDouble(down=True)
    settings = Settings(redis_url=redis_server.url, embedding_cpu_url="http://embedding-cpu")
    app = create_app(
        settings,
        retriever_transport=httpx.MockTransport(RetrieverDouble()),
        embedding_transport=gpu.transport(),
        cpu_embedding_transport=cpu.transport(),
    )
    async with in_process(app) as client:
        checks = (await client.get("/v1/status")).json()["checks"]
        assert checks["embedding"] == (
            "embedding is unavailable: too many texts waiting; embedding-cpu is unavailable: too many texts waiting"
        )
        assert checks["retriever"] == checks["qdrant"] == "ok"
        assert [r.url.path for r in gpu.requests] == [r.url.path for r in cpu.requests] == ["/readyz"]
        cpu.down = False
        checks = (await client.get("/v1/status")).json()["checks"]
        assert checks["embedding"] == "ok"


async def test_status_is_degraded_without_a_live_worker_and_ok_once_one_beats(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    settings = Settings(redis_url=redis_server.url, llm_stream="t:status:workers")
    app = create_app(
        settings,
        retriever_transport=httpx.MockTransport(RetrieverDouble()),
        embedding_transport=EmbeddingDouble().transport(),
    )
    async with in_process(app) as client:
        response = await client.get("/v1/status")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "degraded"
        assert body["checks"]["llm_workers"] == "no live LLM worker"
        assert {name for name, value in body["checks"].items() if not is_ok(value)} == {"llm_workers"}

        worker_redis = Redis.from_url(redis_server.url, decode_responses=True)
        worker_settings = LlmSettings(redis_url=redis_server.url, llm_stream="t:status:workers")
        worker = Worker(worker_settings, ScriptedEngine(), worker_redis, name="status-worker")
        task = asyncio.create_task(worker.run())
        try:
            await wait_for(lambda: _live(worker, 1))
            body = (await client.get("/v1/status")).json()
            assert body["status"] == "ok"
            assert body["checks"]["llm_workers"] == "ok (1 live)"
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, 10)
            await worker_redis.aclose()
        body = (await client.get("/v1/status")).json()  # a clean stop takes the worker out at once
        assert body["status"] == "degraded"
        assert body["checks"]["llm_workers"] == "no live LLM worker"


async def _live(worker: Worker, count: int) -> bool:
    return await worker.queue.live_workers() == count


async def test_a_full_redis_is_a_503_busy_and_status_shows_its_memory(tmp_path: Path) -> None:
    port = free_port()
    server = start_redis(port)
    url = f"redis://127.0.0.1:{port}/0"
    app = create_app(
        Settings(redis_url=url, retry_after_seconds=3),
        retriever_transport=httpx.MockTransport(RetrieverDouble()),
        embedding_transport=EmbeddingDouble().transport(),
    )
    try:
        async with in_process(app) as client, Redis.from_url(url, decode_responses=True) as redis:
            await redis.config_set("maxmemory", str(100 * 2**20))
            redis_ok = (await client.get("/v1/status")).json()["checks"]["redis"]
            assert re.fullmatch(r"ok \(memory \d+\.\d MiB of 100\.0 MiB, \d+%, noeviction\)", redis_ok), redis_ok
            await redis.config_set("maxmemory", "1")  # below what it already uses: every write is refused
            asked = await client.post("/v1/ask", json=ASK)
            assert asked.status_code == 503
            assert asked.json() == {"error": "busy", "detail": "the job queue is out of memory"}
            assert asked.headers["retry-after"] == "3"
            status = await client.get("/v1/status")
            full = status.json()["checks"]["redis"]
            assert status.json()["status"] == "degraded"
            assert re.fullmatch(
                r"out of memory: \d+\.\d MiB used of maxmemory 0\.0 MiB \(noeviction\): it refuses new jobs", full
            ), full
            await redis.config_set("maxmemory", "0")
    finally:
        server.stop()


async def test_a_frozen_embedding_service_is_named_not_the_retriever_whose_own_check_waits_on_it(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    """The retriever's report takes as long as its own bounded check of the frozen embedding service; the
    gateway waits a margin longer for it, so the one that stalled is the one named."""
    inner = 5.0

    async def retriever(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(inner)  # its check of the embedding service ran out of its bound
        checks = {"retriever": "ok", "qdrant": "ok", "embedding": f"no answer within {inner:g} s"}
        return httpx.Response(200, json={"status": "degraded", "service": "retriever", "checks": checks})

    async def frozen(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(60)
        return httpx.Response(200, json={"status": "ok"})

    app = create_app(
        Settings(redis_url=redis_server.url),
        retriever_transport=httpx.MockTransport(retriever),
        embedding_transport=httpx.MockTransport(frozen),
    )
    async with in_process(app) as client:
        checks = (await asyncio.wait_for(client.get("/v1/status"), inner + STATUS_MARGIN_SECONDS + 5)).json()["checks"]
    assert checks["embedding"] == f"no answer within {inner:g} s"
    assert checks["retriever"] == checks["qdrant"] == "ok"
