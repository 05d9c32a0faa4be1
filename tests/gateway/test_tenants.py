"""Keys with tenants and scopes (RAG_API_KEYS_FILE): what the file may hold, which scope each route needs, the
tenant the gateway names to the retriever, and the rate limit of a tenant as a whole."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from services.gateway.app import create_app
from services.gateway.config import Settings
from services.gateway.security import Guard
from services.gateway.tenants import read_keys_file
from tests.fixtures.apps import in_process
from tests.fixtures.redis import RedisServer
from tests.gateway.conftest import RetrieverDouble

KEYS = """
- key: key-a
  tenant: team-a
  scopes: [read, write]
- sha256: sha256:{digest_b}
  tenant: team-b
  scopes: [read, write]
- key: key-b-read
  tenant: team-b
  scopes: [read]
- key: key-b-write
  tenant: team-b
  scopes: [write]
"""


def keys_file(tmp_path: Path, text: str | None = None) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(text if text is not None else KEYS.format(digest_b=hashlib.sha256(b"key-b").hexdigest()))
    return path


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("- {tenant: a, scopes: [read]}\n", "entry 0: give exactly one of key and sha256"),
        ("- {key: k, sha256: 'ab', tenant: a, scopes: [read]}\n", "entry 0: give exactly one of key and sha256"),
        ("- {key: k, tenant: a, scopes: [read]}\n- {key: k2, tenant: 'a b', scopes: [read]}\n", "entry 1: tenant"),
        ("- {key: k, tenant: a, scopes: [admin]}\n", "entry 0: scopes.0"),
        ("- {key: k, tenant: a, scopes: []}\n", "entry 0: scopes"),
        ("- {key: k, tenant: a}\n", "entry 0: scopes: Field required"),
        ("- {sha256: 'sha256:abcd', tenant: a, scopes: [read]}\n", "entry 0: sha256: must be 64 hexadecimal digits"),
        ("- {key: k, tenant: a, scopes: [read]}\n- {key: k, tenant: b, scopes: [write]}\n", "entry 1: the same key"),
        ("- {key: k, tenant: a, scopes: [read], role: admin}\n", "entry 0: role"),
        ("key: k\n", "must be a list"),
        ("- [unclosed\n", "not valid YAML"),
    ],
)
def test_a_bad_keys_file_stops_the_gateway_naming_the_entry_and_field(tmp_path: Path, text: str, named: str) -> None:
    path = keys_file(tmp_path, text)
    with pytest.raises(ValidationError) as raised:
        Settings(api_keys_file=str(path))
    assert f"RAG_API_KEYS_FILE={path}" in str(raised.value)
    assert named in str(raised.value)


def test_a_missing_keys_file_stops_the_gateway(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"RAG_API_KEYS_FILE=.*nowhere.yaml: cannot be read"):
        Settings(api_keys_file=str(tmp_path / "nowhere.yaml"))


def test_a_digest_is_taken_with_or_without_its_mark_and_a_keys_file_satisfies_required_keys(tmp_path: Path) -> None:
    hexdigest = hashlib.sha256(b"secret").hexdigest()
    path = keys_file(
        tmp_path,
        f"- {{sha256: {hexdigest}, tenant: a, scopes: [read]}}\n"
        f"- {{sha256: 'SHA256:{hashlib.sha256(b'other').hexdigest()}', tenant: b, scopes: [write, read]}}\n",
    )
    entries = read_keys_file(path)
    assert [(e.digest.hex(), e.tenant, sorted(e.scopes)) for e in entries] == [
        (hexdigest, "a", ["read"]),
        (hashlib.sha256(b"other").hexdigest(), "b", ["read", "write"]),
    ]
    assert Settings(api_keys_file=str(path), require_api_keys=True).key_entries == entries


def test_a_key_in_both_rag_api_keys_and_the_file_stops_the_gateway(tmp_path: Path) -> None:
    settings = Settings(api_keys="key-b,other", api_keys_file=str(keys_file(tmp_path)))
    with pytest.raises(ValueError, match="RAG_API_KEYS_FILE: entry 1: the same key as one in RAG_API_KEYS"):
        Guard(settings)


class Gateway:
    def __init__(self, client: httpx.AsyncClient, retriever: RetrieverDouble) -> None:
        self.client = client
        self.retriever = retriever

    def tenants_sent(self) -> list[str | None]:
        return [request.headers.get("x-ragpod-tenant") for request in self.retriever.requests]


@pytest.fixture
async def gateway(
    redis_server: RedisServer, redis_client: Redis, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Gateway]:
    """Keys of three tenants; ``redis_client`` empties Redis first, so no rate limit carries over."""
    extra: dict[str, Any] = getattr(request, "param", {})
    settings = Settings(
        redis_url=redis_server.url,
        api_keys="key-default",
        api_keys_file=str(keys_file(tmp_path)),
        auth_failures_per_minute=0,
        **extra,
    )
    retriever = RetrieverDouble()
    app = create_app(settings, retriever_transport=httpx.MockTransport(retriever))
    async with in_process(app, base_url="http://gateway") as client:
        yield Gateway(client, retriever)


SEARCH = {"question": "What is the Zorblax?", "top_k": 1}
DOCUMENTS = {"documents": [{"id": "d", "text": "text"}]}
WRITES: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/v1/documents", {"json": DOCUMENTS}),
    ("POST", "/v1/files", {"files": {"files": ("a.txt", b"some text", "text/plain")}}),
    ("DELETE", "/v1/documents/d", {}),
    ("POST", "/v1/documents/delete", {"json": {"prefix": "d"}}),
]
READS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/v1/search", {"json": SEARCH}),
    ("POST", "/v1/ask", {"json": SEARCH}),
    ("POST", "/v1/chat/completions", {"json": {"model": "ragpod", "messages": [{"role": "user", "content": "Hi?"}]}}),
    ("GET", "/v1/models", {}),
    ("GET", "/v1/documents", {}),
    ("GET", "/v1/documents/d", {}),
]


@pytest.mark.parametrize(("method", "path", "options"), WRITES)
async def test_a_read_only_key_cannot_ingest_or_delete(
    gateway: Gateway, method: str, path: str, options: dict[str, Any]
) -> None:
    response = await gateway.client.request(method, path, headers=bearer("key-b-read"), **options)
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "forbidden"
    assert "'write' scope" in response.json()["detail"]
    assert gateway.retriever.requests == []  # refused before anything reached the retriever


@pytest.mark.parametrize(("method", "path", "options"), READS)
async def test_a_write_only_key_cannot_read(gateway: Gateway, method: str, path: str, options: dict[str, Any]) -> None:
    response = await gateway.client.request(method, path, headers=bearer("key-b-write"), **options)
    assert response.status_code == 403, response.text
    body = response.json()
    kind = body["error"]["code"] if path.startswith(("/v1/chat", "/v1/models")) else body["error"]
    assert kind == "forbidden"
    assert gateway.retriever.requests == []


async def test_status_takes_any_valid_key(gateway: Gateway) -> None:
    assert (await gateway.client.get("/v1/status", headers=bearer("key-b-write"))).status_code != 401
    assert (await gateway.client.get("/v1/status", headers=bearer("wrong"))).status_code == 401


@pytest.mark.parametrize(
    ("key", "tenant"),
    [("key-a", "team-a"), ("key-b", "team-b"), ("key-b-read", "team-b"), ("key-default", "default")],
)
async def test_the_retriever_is_told_the_key_s_tenant_on_every_call(gateway: Gateway, key: str, tenant: str) -> None:
    assert (await gateway.client.post("/v1/search", json=SEARCH, headers=bearer(key))).status_code == 200
    await gateway.client.get("/v1/documents", headers=bearer(key))
    await gateway.client.get("/v1/documents/d", headers=bearer(key))
    assert gateway.tenants_sent() == [tenant] * 3


async def test_without_keys_every_call_is_the_default_tenant_s(redis_server: RedisServer) -> None:
    retriever = RetrieverDouble()
    app = create_app(Settings(redis_url=redis_server.url), retriever_transport=httpx.MockTransport(retriever))
    async with in_process(app, base_url="http://gateway") as client:
        assert (await client.post("/v1/search", json=SEARCH)).status_code == 200
        assert (await client.post("/v1/documents", json=DOCUMENTS)).status_code == 200
    assert [r.headers.get("x-ragpod-tenant") for r in retriever.requests] == ["default", "default"]
    assert json.loads(retriever.requests[1].content)["documents"][0]["id"] == "d"


@pytest.mark.parametrize("gateway", [{"tenant_rate_limit_per_minute": 3}], indirect=True)
async def test_a_tenant_s_keys_share_its_rate_limit_and_other_tenants_are_not_counted(gateway: Gateway) -> None:
    for key in ("key-b", "key-b-read", "key-b"):
        assert (await gateway.client.post("/v1/search", json=SEARCH, headers=bearer(key))).status_code == 200
    over = await gateway.client.post("/v1/search", json=SEARCH, headers=bearer("key-b-read"))
    assert over.status_code == 429
    assert over.json()["error"] == "rate_limited"
    assert "RAG_TENANT_RATE_LIMIT_PER_MINUTE" in over.json()["detail"]
    assert int(over.headers["Retry-After"]) >= 1
    assert (await gateway.client.post("/v1/search", json=SEARCH, headers=bearer("key-a"))).status_code == 200


@pytest.mark.parametrize("gateway", [{"rate_limit_per_minute": 2, "tenant_rate_limit_per_minute": 100}], indirect=True)
async def test_the_limit_per_key_still_holds_within_a_tenant(gateway: Gateway) -> None:
    for _ in range(2):
        assert (await gateway.client.post("/v1/search", json=SEARCH, headers=bearer("key-b"))).status_code == 200
    over = await gateway.client.post("/v1/search", json=SEARCH, headers=bearer("key-b"))
    assert over.status_code == 429
    assert "RAG_TENANT" not in over.json()["detail"]
    assert (await gateway.client.post("/v1/search", json=SEARCH, headers=bearer("key-b-read"))).status_code == 200
