"""The queue seen through /v1/ask with every part a real process: streaming, a full queue, Redis going away.

embedding, retriever, gateway and an llm worker run as ``python -m
services.<name>`` (ragpod.supervisor.Stack); the worker bridges to the real
model server of tests/fixtures/llm.py. Redis is the session's real server,
stopped and started again by the last test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from ragpod.processes import free_port
from ragpod.supervisor import SERVICES, Stack
from services.common.queue import Job, JobQueue
from services.gateway.config import Settings as GatewaySettings
from tests.fixtures.llm import MODEL_NAME, LlmServer, parse_sse, queue_env, queue_names, wait_for
from tests.fixtures.redis import RedisServer

pytestmark = pytest.mark.slow

STREAM = "t:stack"
MAX_DEPTH = 3
DOCUMENT = {
    "id": "zorblax.md",
    "text": "The Zorblax is a blue teapot made in Lisbon. It was first sold in 1987.",
    "metadata": {"title": "Zorblax"},
}
ASK = {"question": "Where is the Zorblax made?", "top_k": 1}


@pytest.fixture(scope="module")
def stack(
    redis_server: RedisServer, llm_server: LlmServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("stack")
    extra = {
        **queue_env(redis_server.url, STREAM),
        "RAG_LLM_BACKEND": "openai",
        "RAG_LLM_OPENAI_URL": llm_server.url,
        "RAG_LLM_MODEL_NAME": MODEL_NAME,
        "RAG_LLM_MAX_NEW_TOKENS": "12",
        "RAG_LLM_CONCURRENCY": "2",
        "RAG_MAX_QUEUE_DEPTH": str(MAX_DEPTH),
        "RAG_RETRY_AFTER_SECONDS": "3",
        "RAG_ASK_TIMEOUT_SECONDS": "90",
        "RAG_LOG_JSON": "false",
    }
    stack = Stack(
        ports={name: free_port() for name in SERVICES},
        redis_port=redis_server.port,
        data_dir=data,
        log_dir=data / "logs",
        extra_env=extra,
    )
    stack.start(redis=False, ready_timeout=240)
    try:
        response = httpx.post(f"{gateway_url(stack)}/v1/documents", json={"documents": [DOCUMENT]}, timeout=120)
        assert response.status_code == 200, response.text
        yield stack
    finally:
        stack.stop()


def gateway_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.ports['gateway']}"


def queue_for(redis: Redis) -> JobQueue:
    return JobQueue(redis, GatewaySettings(**queue_names(STREAM)))


async def ask(stack: Stack, payload: dict[str, object], wait: float = 120) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gateway_url(stack), timeout=wait) as client:
        return await client.post("/v1/ask", json=payload)


async def test_streamed_answer_arrives_token_by_token_then_sources_and_timings(stack: Stack) -> None:
    arrivals: list[float] = []
    text = ""
    async with (
        httpx.AsyncClient(base_url=gateway_url(stack), timeout=120) as client,
        client.stream("POST", "/v1/ask", json={**ASK, "stream": True}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for chunk in response.aiter_text():
            arrivals.append(time.perf_counter())
            text += chunk
    events = parse_sse(text)
    names = [name for name, _ in events]
    # Tokens, then done; or, when the model's answer did not pass the check, a reset and the answer given instead.
    assert names[-1] == "done" and set(names[:-1]) <= {"token", "reset"} and names.count("reset") <= 1, names
    assert names[0] == "token"
    done = events[-1][1]
    assert done["answer"]
    given = events[names.index("reset") + 1 : -1] if "reset" in names else events[:-1]
    assert "".join(data["text"] for _, data in given).strip() == done["answer"]
    assert [s["document_id"] for s in done["sources"]] == ["zorblax.md"]
    assert done["timings"]["generate_ms"] > 0 and done["timings"]["total_ms"] >= done["timings"]["generate_ms"]
    assert done["model"] == MODEL_NAME
    assert len(arrivals) > 2  # the events came in pieces as they were made, not in one body at the end


async def test_full_queue_is_503_with_retry_after_then_served_again(stack: Stack, redis_client: Redis) -> None:
    worker = stack.proc("llm").popen
    queue = queue_for(redis_client)
    await queue.ensure_group()
    os.kill(worker.pid, signal.SIGSTOP)  # the worker takes nothing: the queue fills
    try:
        for _ in range(MAX_DEPTH):  # already past their deadline, so dropped at once once the worker is back
            await queue.enqueue(Job(messages=[{"role": "user", "content": "x"}], deadline=time.time() - 1))
        full = await ask(stack, ASK)
        assert full.status_code == 503
        assert full.headers["retry-after"] == "3"
        assert full.json()["error"] == "queue_full"
        streamed = await ask(stack, {**ASK, "stream": True})
        assert streamed.status_code == 503 and streamed.json()["error"] == "queue_full"
        assert await queue.depth() == MAX_DEPTH  # refused before enqueueing
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    await wait_for(lambda: _depth_is(queue, 0), within=30)
    served = await ask(stack, ASK)
    assert served.status_code == 200, served.text
    assert served.json()["answer"]


async def _depth_is(queue: JobQueue, depth: int) -> bool:
    return await queue.depth() == depth


async def test_redis_down_is_503_and_recovery_needs_no_restart(stack: Stack, redis_server: RedisServer) -> None:
    pids = {proc.name: proc.popen.pid for proc in stack.procs}
    redis_server.proc.stop()
    try:
        for payload in (ASK, {**ASK, "stream": True}):
            down = await ask(stack, payload, wait=30)
            assert down.status_code == 503
            assert down.json() == {"error": "upstream_unavailable", "detail": "the job queue (redis) is unavailable"}
        async with httpx.AsyncClient(timeout=10) as client:
            ready = await client.get(f"{gateway_url(stack)}/readyz")
            assert ready.status_code == 200  # readiness never follows a dependency: the pod stays in its Service
            status = (await client.get(f"{gateway_url(stack)}/v1/status")).json()
            assert status["status"] == "degraded" and status["checks"]["redis"] != "ok"
    finally:
        redis_server.restart()

    # Back: the gateway reconnects, the worker re-creates its group on the empty server; nobody restarted.
    deadline = time.monotonic() + 120
    while True:
        response = await ask(stack, ASK)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    assert response.status_code == 200, response.text
    assert response.json()["answer"]
    assert {proc.name: proc.popen.pid for proc in stack.procs} == pids
    assert all(proc.alive() for proc in stack.procs)
