"""The front door: API keys kept as digests, a rate limit in Redis shared by every gateway process, fail
open or closed when that Redis is down, and bodies over the limit refused before they are read."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from ragpod.processes import free_port
from services.gateway.app import create_app
from services.gateway.config import Settings
from services.gateway.security import parse_api_keys
from tests.fixtures.apps import in_process
from tests.fixtures.llm import wait_for
from tests.fixtures.redis import RedisServer
from tests.gateway.conftest import RetrieverDouble

ROOT = Path(__file__).resolve().parents[2]
KEY_A = "alpha-key-0123456789"
KEY_B = "bravo-key-9876543210"
QUERY = {"question": "When was the Zorblax first sold?"}
WRONG = "wrong-key-5f1e2d"
DIGEST_B = "sha256:" + hashlib.sha256(KEY_B.encode()).hexdigest()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def start_gateway(port: int, redis_url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "RAG_PORT": str(port),
        "RAG_REDIS_URL": redis_url,
        "RAG_RETRIEVER_URL": f"http://127.0.0.1:{free_port()}",
        "RAG_API_KEYS": f"{KEY_A},{DIGEST_B}",
        "RAG_RATE_LIMIT_PER_MINUTE": "3",
        "RAG_LOG_LEVEL": "debug",
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.gateway"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway on port {port} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"gateway on port {port} did not start")


@pytest.fixture
def two_gateways(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[str, str, list[Path]]]:
    ports = [free_port(), free_port()]
    logs = [tmp_path / "gateway-1.log", tmp_path / "gateway-2.log"]
    procs = [start_gateway(port, redis_server.url, log) for port, log in zip(ports, logs, strict=True)]
    try:
        for port, proc in zip(ports, procs, strict=True):
            wait_ready(port, proc)
        yield f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}", logs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=120)


@pytest.mark.slow
def test_two_gateway_processes_share_one_rate_limit(
    redis_client: Redis, two_gateways: tuple[str, str, list[Path]]
) -> None:
    first, second, logs = two_gateways
    for _ in range(3):
        assert httpx.get(f"{first}/v1/models", headers=bearer(KEY_A)).status_code == 200
    refused = httpx.get(f"{second}/v1/models", headers=bearer(KEY_A))  # the other process saw the first's three
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"]["code"] == "rate_limited"  # /v1/models answers in OpenAI's shape
    assert httpx.post(f"{first}/v1/search", json={"question": "q"}, headers=bearer(KEY_A)).status_code == 429
    # The limit is per key: the other key (configured as a digest) is untouched, on either process.
    assert httpx.get(f"{second}/v1/models", headers={"X-API-Key": KEY_B}).status_code == 200
    assert httpx.get(f"{first}/v1/models", headers=bearer(WRONG)).status_code == 401
    texts = [log.read_text() for log in logs]
    assert '"rate_limited"' in texts[1]  # the refusal is logged, naming the key by a digest prefix only
    for text in texts:
        assert KEY_A not in text and KEY_B not in text and WRONG not in text


async def test_keys_and_digests_authenticate_and_others_are_refused(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    settings = Settings(redis_url=redis_server.url, api_keys=f"{KEY_A}, {DIGEST_B}")
    app = create_app(settings, retriever_transport=httpx.MockTransport(RetrieverDouble()))
    async with in_process(app) as client:
        assert (await client.post("/v1/search", json=QUERY, headers=bearer(KEY_A))).status_code == 200
        assert (await client.post("/v1/search", json=QUERY, headers={"X-API-Key": KEY_B})).status_code == 200
        for headers in ({}, bearer("nope"), bearer(DIGEST_B), {"X-API-Key": DIGEST_B[7:]}):
            refused = await client.post("/v1/search", json=QUERY, headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"] == "unauthorized"
        chat = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert chat.status_code == 401 and chat.json()["error"]["type"] == "authentication_error"
        # Health, readiness and the page stay open for probes and browsers.
        assert (await client.get("/healthz")).status_code == 200


async def test_a_refusal_challenges_for_a_bearer_key_and_failed_keys_are_rate_limited_per_address(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    settings = Settings(redis_url=redis_server.url, api_keys=KEY_A, auth_failures_per_minute=3)
    app = create_app(settings, retriever_transport=httpx.MockTransport(RetrieverDouble()))
    async with in_process(app) as client:
        refused = [await client.post("/v1/search", json=QUERY, headers=bearer(f"{WRONG}{n}")) for n in range(3)]
        assert [r.status_code for r in refused] == [401, 401, 401]
        assert all(r.headers["www-authenticate"].startswith("Bearer") for r in refused)
        chat = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert chat.status_code == 429  # the fourth failure's address is over its limit: refused before its key
        assert chat.json()["error"]["code"] == "rate_limited" and 1 <= int(chat.headers["retry-after"]) <= 60
        # Over the limit, a right key from that address is refused too: a guess that hits learns nothing.
        limited = await client.post("/v1/search", json=QUERY, headers=bearer(KEY_A))
        assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
        assert "failed authentications" in limited.json()["detail"]
    assert any(key.startswith("rag:authfail") for key in await redis_client.keys("*"))
    # Another address is not affected; the count is kept per address.
    async with in_process(app, client=("10.0.0.9", 4000)) as elsewhere:
        assert (await elsewhere.post("/v1/search", json=QUERY, headers=bearer(KEY_A))).status_code == 200


def test_a_malformed_digest_is_refused_at_start_naming_the_variable() -> None:
    with pytest.raises(ValueError, match="RAG_API_KEYS"):
        parse_api_keys("sha256:abc")
    assert parse_api_keys(" , ") == []
    assert parse_api_keys(DIGEST_B.upper().replace("SHA256", "sha256")) == [hashlib.sha256(KEY_B.encode()).digest()]


async def test_the_rate_limit_answers_429_with_retry_after(redis_server: RedisServer, redis_client: Redis) -> None:
    settings = Settings(redis_url=redis_server.url, rate_limit_per_minute=2)
    app = create_app(settings, retriever_transport=httpx.MockTransport(RetrieverDouble()))
    async with in_process(app) as client:
        assert [(await client.post("/v1/search", json=QUERY)).status_code for _ in range(2)] == [200, 200]
        refused = await client.post("/v1/search", json=QUERY)
        assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert any(key.startswith("rag:ratelimit") for key in await redis_client.keys("*"))


@pytest.mark.parametrize("fail_open", [True, False])
async def test_a_rate_limiter_whose_redis_is_down_fails_open_or_closed(
    fail_open: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", rate_limit_per_minute=5, rate_limit_fail_open=fail_open
    )
    app = create_app(settings, retriever_transport=httpx.MockTransport(RetrieverDouble()))
    async with in_process(app) as client:
        response = await client.post("/v1/search", json=QUERY)
    if fail_open:
        assert response.status_code == 200
        captured = capsys.readouterr()
        assert "rate_limit_unavailable_fail_open" in captured.out + captured.err
    else:
        assert response.status_code == 503
        assert response.json() == {
            "error": "upstream_unavailable",
            "detail": "the rate limiter's store (redis) is unavailable",
        }


async def test_a_body_over_the_limit_is_refused_before_it_is_read(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    retriever = RetrieverDouble()
    settings = Settings(redis_url=redis_server.url, max_body_bytes=4096)
    app = create_app(settings, retriever_transport=httpx.MockTransport(retriever))
    async with in_process(app) as client:
        docs = {"documents": [{"id": "a", "text": "x" * 5000}]}
        response = await client.post("/v1/documents", json=docs)
        assert response.status_code == 413
        assert response.json()["error"] == "payload_too_large" and "4096" in response.json()["detail"]
        # Not valid JSON at all: still a 413, since the body is never parsed.
        garbage = await client.post("/v1/ask", content=b"{" * 5000, headers={"content-type": "application/json"})
        assert garbage.status_code == 413
        small = await client.post("/v1/documents", json={"documents": [{"id": "a", "text": "x" * 100}]})
        assert small.status_code == 200
    assert [r.url.path for r in retriever.requests] == ["/v1/documents"]


def held_at(path: str, release: asyncio.Event) -> tuple[RetrieverDouble, httpx.MockTransport]:
    """A stand-in retriever that records every call and holds those to ``path`` until ``release`` is set."""
    double = RetrieverDouble()

    async def held(request: httpx.Request) -> httpx.Response:
        response = double(request)
        if request.url.path == path:
            await release.wait()
        return response

    return double, httpx.MockTransport(held)


async def test_beyond_the_concurrency_limit_a_request_is_busy_and_the_probes_are_not_counted() -> None:
    release = asyncio.Event()
    double, transport = held_at("/v1/search", release)
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", max_concurrent_requests=2)
    app = create_app(settings, retriever_transport=transport)
    async with in_process(app) as client:
        held = [asyncio.create_task(client.post("/v1/search", json=QUERY)) for _ in range(2)]

        async def both_waiting() -> bool:  # both in their handlers, waiting for the retriever
            return len(double.requests) >= 2

        await wait_for(both_waiting)
        refused = await client.post("/v1/search", json=QUERY)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == "busy" and "RAG_MAX_CONCURRENT_REQUESTS" in refused.json()["detail"]
        assert "x-request-id" in refused.headers  # refused inside the request id middleware
        models = await client.get("/v1/models")
        assert models.status_code == 503 and models.json()["error"]["code"] == "busy"  # OpenAI's shape there
        for probe in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(probe)).status_code == 200, probe
        release.set()
        assert [(await task).status_code for task in held] == [200, 200]
        assert (await client.post("/v1/search", json=QUERY)).status_code == 200  # the slots are free again


async def test_beyond_the_upload_limit_an_upload_is_busy_before_its_body_is_read_and_other_requests_pass() -> None:
    """Each upload may spool up to RAG_MAX_BODY_BYTES to /tmp before its handler runs: their number is bounded
    (RAG_MAX_CONCURRENT_UPLOADS), so /tmp can be sized for them (deploy/k8s: the gateway's emptyDir)."""
    release = asyncio.Event()
    double, transport = held_at("/v1/documents", release)
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", max_concurrent_uploads=1)
    app = create_app(settings, retriever_transport=transport)
    upload = {"files": ("notes.txt", b"The Zorblax was first sold in 1987.\n" * 100, "text/plain")}
    async with in_process(app) as client:
        held = asyncio.create_task(client.post("/v1/files", files=upload))

        async def indexing() -> bool:  # the first upload is in its handler, waiting for the retriever
            return any(r.url.path == "/v1/documents" for r in double.requests)

        await wait_for(indexing, within=60)  # parsed in a worker process first: slow on a loaded machine
        refused = await client.post("/v1/files", files=upload)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json() == {
            "error": "busy",
            "detail": "the gateway is serving its limit of 1 uploads (RAG_MAX_CONCURRENT_UPLOADS); retry later",
        }
        assert (await client.post("/v1/search", json=QUERY)).status_code == 200  # not an upload: not counted
        release.set()
        assert (await held).status_code == 200
        assert (await client.post("/v1/files", files=upload)).status_code == 200  # the slot is free again
    assert sum(r.url.path == "/v1/documents" for r in double.requests) == 2
