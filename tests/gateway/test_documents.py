"""/v1/documents (list, get, delete) and /v1/search through the gateway, on a real retriever and store."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from redis.asyncio import Redis

from services.embedding.model import Embedder
from services.gateway.app import create_app
from services.gateway.config import Settings
from tests.fixtures.apps import in_process
from tests.fixtures.gateway_stack import InThread, Stack, stack
from tests.fixtures.redis import RedisServer
from tests.gateway.conftest import Gateway, RetrieverDouble

__all__ = ["stack"]

DOCS = [
    {
        "id": "handbook/vacation.md",
        "text": "Employees get 27 days of paid vacation per year.",
        "metadata": {"team": "hr"},
    },
    {"id": "odd?id%20#with/parts", "text": "The Zorblax was first sold in 1987 by a small shop in Oslo."},
    {"id": "k8s", "text": "A DaemonSet runs one pod on every node of the cluster."},
]


async def index(stack: Stack, *docs: dict[str, object]) -> None:
    response = await stack.gateway.post("/v1/documents", json={"documents": list(docs)})
    assert response.status_code == 200, response.text


async def test_documents_are_listed_a_page_at_a_time(stack: Stack) -> None:
    await index(stack, *DOCS)
    first = await stack.gateway.get("/v1/documents", params={"limit": 2})
    assert first.status_code == 200, first.text
    page = first.json()
    assert len(page["documents"]) == 2 and page["next_cursor"]
    second = (await stack.gateway.get("/v1/documents", params={"limit": 2, "cursor": page["next_cursor"]})).json()
    assert len(second["documents"]) == 1 and second["next_cursor"] is None
    listed = {d["id"]: d for d in page["documents"] + second["documents"]}
    assert list(listed) == ["handbook/vacation.md", "k8s", "odd?id%20#with/parts"]  # in id order
    assert listed["handbook/vacation.md"]["chunks"] == 1
    assert listed["handbook/vacation.md"]["metadata"]["team"] == "hr"


async def test_the_cursor_of_a_long_id_passes_the_gateway(stack: Stack) -> None:
    long_id = "\u00e9" * 512  # the longest id, two bytes a character
    await index(stack, {"id": long_id, "text": "The longest id."}, {"id": "\u00ea", "text": "After it."})
    first = (await stack.gateway.get("/v1/documents", params={"limit": 1})).json()
    assert [d["id"] for d in first["documents"]] == [long_id] and len(first["next_cursor"]) > 1024
    second = await stack.gateway.get("/v1/documents", params={"limit": 1, "cursor": first["next_cursor"]})
    assert second.status_code == 200, second.text
    assert [d["id"] for d in second.json()["documents"]] == ["\u00ea"] and second.json()["next_cursor"] is None


async def test_documents_are_deleted_in_bulk_by_prefix_and_by_metadata(stack: Stack) -> None:
    many = [{"id": f"docs/{i:03d}.md", "text": f"Guide number {i}.", "metadata": {"team": "web"}} for i in range(40)]
    await index(stack, *DOCS, *many, {"id": "docs.md", "text": "Beside the folder, not in it."})
    deleted = await stack.gateway.post("/v1/documents/delete", json={"prefix": "docs/"})
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"deleted": 40}
    by_metadata = await stack.gateway.post("/v1/documents/delete", json={"filter": {"team": "hr"}})
    assert by_metadata.json() == {"deleted": 1}
    remaining = [d["id"] for d in (await stack.gateway.get("/v1/documents")).json()["documents"]]
    assert remaining == ["docs.md", "k8s", "odd?id%20#with/parts"]
    nothing = await stack.gateway.post("/v1/documents/delete", json={"prefix": "docs/"})
    assert nothing.json() == {"deleted": 0}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "prefix"),
        ({"prefix": ""}, "prefix"),
        ({"filter": {}}, "filter"),
        ({"filter": {"team": [1]}}, "filter"),
        ({"filter": {"n": 2**70}}, "filter"),
    ],
)
async def test_a_bulk_delete_without_a_selector_is_422_and_reaches_nothing(
    gateway: Gateway, payload: dict[str, object], field: str
) -> None:
    response = await gateway.client.post("/v1/documents/delete", json=payload)
    assert response.status_code == 422
    assert response.json()["error"] == "validation_error" and response.json()["detail"].startswith(field)
    assert gateway.retriever.requests == []


async def test_a_bulk_delete_needs_a_key_when_keys_are_set(redis_server: RedisServer, redis_client: Redis) -> None:
    seen: list[httpx.Request] = []

    def retriever(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"deleted": 3})

    settings = Settings(redis_url=redis_server.url, api_keys="s3cret-key-for-bulk")
    app = create_app(settings, retriever_transport=httpx.MockTransport(retriever))
    async with in_process(app) as client:
        refused = await client.post("/v1/documents/delete", json={"prefix": "docs/"})
        assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
        assert seen == []
        allowed = await client.post(
            "/v1/documents/delete", json={"prefix": "docs/"}, headers={"Authorization": "Bearer s3cret-key-for-bulk"}
        )
    assert allowed.status_code == 200 and allowed.json() == {"deleted": 3}
    assert [(r.method, r.url.path, json.loads(r.content)) for r in seen] == [
        ("POST", "/v1/documents/delete", {"prefix": "docs/"})
    ]


@pytest.mark.parametrize("document_id", ["handbook/vacation.md", "odd?id%20#with/parts"])
async def test_a_document_is_read_and_deleted_by_an_id_that_may_hold_slashes(stack: Stack, document_id: str) -> None:
    await index(stack, *DOCS)
    path = "/v1/documents/" + quote(document_id, safe="/")
    got = await stack.gateway.get(path)
    assert got.status_code == 200, got.text
    assert got.json()["id"] == document_id and got.json()["chunks"] == 1
    deleted = await stack.gateway.delete(path)
    assert deleted.status_code == 204 and deleted.content == b""
    assert (await stack.gateway.get(path)).status_code == 404
    again = await stack.gateway.delete(path)
    assert again.status_code == 404
    assert again.json()["error"] == "not_found" and document_id in again.json()["detail"]
    remaining = {d["id"] for d in (await stack.gateway.get("/v1/documents")).json()["documents"]}
    assert remaining == {d["id"] for d in DOCS} - {document_id}


async def test_an_unknown_document_is_a_404(stack: Stack) -> None:
    for method in ("GET", "DELETE"):
        response = await stack.gateway.request(method, "/v1/documents/never/indexed")
        assert response.status_code == 404
        assert response.json() == {"error": "not_found", "detail": "document 'never/indexed' is not indexed"}


async def test_a_deleted_document_is_never_a_source_again(stack: Stack) -> None:
    await index(stack, *DOCS, {"id": "zorblax-2", "text": "The Zorblax 2 was sold from 2001 on, in Oslo too."})
    question = {"question": "When was the Zorblax first sold?", "top_k": 5}
    before = (await stack.gateway.post("/v1/ask", json=question)).json()
    assert before["sources"][0]["document_id"] == "odd?id%20#with/parts"
    assert (await stack.gateway.delete("/v1/documents/odd%3Fid%2520%23with/parts")).status_code == 204
    for route, body in (("/v1/ask", question), ("/v1/search", question)):
        after = await stack.gateway.post(route, json=body)
        assert after.status_code == 200, after.text
        sources = [s["document_id"] for s in after.json()["sources"]]
        assert "zorblax-2" in sources and "odd?id%20#with/parts" not in sources


async def test_search_returns_sources_and_timings_without_generating(stack: Stack) -> None:
    await index(stack, *DOCS)
    response = await stack.gateway.post(
        "/v1/search", json={"question": "How many vacation days?", "top_k": 2, "filters": {"team": "hr"}}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [s["document_id"] for s in body["sources"]] == ["handbook/vacation.md"]
    assert 0 < body["sources"][0]["score"] <= 1
    t = body["timings"]
    assert set(t) == {"embed_ms", "search_ms", "total_ms"} and t["embed_ms"] + t["search_ms"] <= t["total_ms"] + 0.01
    assert stack.engine.calls == [] and await stack.redis.xlen("rag:llm:jobs") == 0


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"question": "q", "top_k": 11}, "top_k"),
        ({"question": "q", "top_k": 0}, "top_k"),
        ({"question": "   "}, "question"),
        ({"question": "x" * 301}, "question"),
        ({"question": "q", "filters": {"team": [1]}}, "filters"),
        ({"question": "q", "filters": {"n": 2**70}}, "filters"),
        ({}, "question"),
    ],
)
async def test_search_validates_like_ask(gateway: Gateway, payload: dict[str, object], field: str) -> None:
    response = await gateway.client.post("/v1/search", json=payload)
    assert response.status_code == 422
    assert response.json()["error"] == "validation_error" and response.json()["detail"].startswith(field)
    assert gateway.retriever.requests == []


async def test_search_applies_the_relevance_floor(redis_server: RedisServer, redis_client: Redis) -> None:
    retriever = RetrieverDouble()
    settings = Settings(redis_url=redis_server.url, min_relevance=0.5)
    app = create_app(settings, retriever_transport=httpx.MockTransport(retriever))
    async with in_process(app) as client:
        body = (await client.post("/v1/search", json={"question": "q", "top_k": 2})).json()
    assert [s["document_id"] for s in body["sources"]] == ["zorblax"]  # "other" scored 0.4


async def test_a_retriever_that_is_down_is_a_503_naming_it(redis_server: RedisServer, redis_client: Redis) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    app = create_app(Settings(redis_url=redis_server.url), retriever_transport=httpx.MockTransport(refuse))
    async with in_process(app) as client:
        for method, path in (
            ("GET", "/v1/documents"),
            ("GET", "/v1/documents/a"),
            ("DELETE", "/v1/documents/a"),
            ("POST", "/v1/documents/delete"),
        ):
            response = await client.request(method, path, json={"prefix": "a"} if method == "POST" else None)
            assert response.status_code == 503
            assert response.json() == {"error": "upstream_unavailable", "detail": "retriever is unavailable"}


@pytest.fixture(scope="module")
def served_stack(
    redis_server: RedisServer, embedder: Embedder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    with InThread(redis_server.url, embedder, tmp_path_factory.mktemp("page")) as url:
        yield url


@pytest.mark.slow
def test_the_web_page_lists_the_documents_and_deletes_one(served_stack: str) -> None:
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Debian's chromium package is needed (make test installs it)"
    response = httpx.post(f"{served_stack}/v1/documents", json={"documents": DOCS}, timeout=120)
    assert response.status_code == 200, response.text
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        page = browser.new_page()
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(f"{served_stack}/")
        page.wait_for_selector("#doc-list li >> nth=2", timeout=30_000)
        listed = sorted(page.locator("#doc-list li").evaluate_all("items => items.map(li => li.dataset.id)"))
        assert listed == sorted(d["id"] for d in DOCS)
        with page.expect_response(lambda r: r.request.method == "DELETE") as deleted:
            page.click('#doc-list li[data-id="odd?id%20#with/parts"] button.delete')
        assert deleted.value.status == 204
        page.wait_for_function("document.querySelectorAll('#doc-list li').length === 2", timeout=30_000)
        status = page.inner_text("#doc-status")
        # Deleted meanwhile by another client: the page's delete fails, and it says so.
        assert httpx.delete(f"{served_stack}/v1/documents/k8s", timeout=30).status_code == 204
        with page.expect_response(lambda r: r.request.method == "DELETE") as failed:
            page.click('#doc-list li[data-id="k8s"] button.delete')
        assert failed.value.status == 404
        page.wait_for_function("document.querySelector('#doc-status').textContent.startsWith('Could not')")
        failed_status = page.inner_text("#doc-status")
        still_listed = page.locator('#doc-list li[data-id="k8s"]').count()
        browser.close()
    assert status == "Deleted odd?id%20#with/parts."
    assert failed_status.startswith("Could not delete k8s: ") and "not indexed" in failed_status
    assert still_listed == 1
    remaining = httpx.get(f"{served_stack}/v1/documents", timeout=30).json()["documents"]
    assert sorted(d["id"] for d in remaining) == ["handbook/vacation.md"]
