"""The web page with API keys on, in a real headless Chromium: it asks for a key, keeps it in the tab's
session storage and sends it as a Bearer header; a refused key is asked for again."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from ragpod.processes import free_port
from services.gateway.app import create_app
from services.gateway.config import Settings
from tests.fixtures.browser import chromium
from tests.fixtures.redis import RedisServer

pytestmark = pytest.mark.slow

KEY = "page-key-0123456789"
DOC = {"id": "handbook/vacation.md", "chunks": 1, "metadata": {"title": "Vacation"}}


def retriever(request: httpx.Request) -> httpx.Response:
    if request.method == "GET" and request.url.path == "/v1/documents":
        return httpx.Response(200, json={"documents": [DOC], "next_cursor": None})
    return httpx.Response(404, json={"error": "not_found", "detail": "no such route"})


@pytest.fixture
def gateway(redis_server: RedisServer) -> Iterator[str]:
    settings = Settings(redis_url=redis_server.url, api_keys=KEY)
    app = create_app(settings, retriever_transport=httpx.MockTransport(retriever))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    for _ in range(300):
        if server.started:
            break
        threading.Event().wait(0.05)
    assert server.started, "the gateway did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def page() -> Iterator[Any]:
    with chromium() as browser:
        yield browser.new_page()


def test_the_page_asks_for_a_key_keeps_it_for_the_tab_and_sends_it_as_a_bearer_header(gateway: str, page: Any) -> None:
    sent: list[str | None] = []
    page.on(
        "request",
        lambda request: sent.append(request.headers.get("authorization")) if "/v1/" in request.url else None,
    )
    page.goto(f"{gateway}/")
    # The document list is refused (401): the page asks for a key instead of showing an error.
    page.wait_for_selector("#key-form:not([hidden])", timeout=30_000)
    assert page.inner_text("#key-note") == "This gateway needs an API key."
    page.fill("#api-key", "not-the-key")
    page.click("#key-use")
    page.wait_for_function(
        "!document.getElementById('key-form').hidden"
        " && document.getElementById('key-note').textContent.includes('refused')",
        timeout=30_000,
    )
    page.fill("#api-key", KEY)
    with page.expect_response(lambda response: "/v1/documents" in response.url and response.status == 200):
        page.click("#key-use")
    page.wait_for_selector("#doc-list li", timeout=30_000)
    assert "Vacation (handbook/vacation.md)" in page.inner_text("#doc-list")
    assert page.is_hidden("#key-form")
    assert page.evaluate("sessionStorage.getItem('ragpod-api-key')") == KEY
    assert page.evaluate("localStorage.length") == 0  # kept for this tab only
    assert sent == [None, "Bearer not-the-key", f"Bearer {KEY}"]
    # A reload in the same tab keeps the key: the list comes at once, no key asked for.
    page.reload()
    page.wait_for_selector("#doc-list li", timeout=30_000)
    assert page.is_hidden("#key-form") and sent[-1] == f"Bearer {KEY}"
