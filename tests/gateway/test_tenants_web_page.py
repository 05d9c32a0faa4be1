"""The web page with a key of one tenant, in a real headless Chromium over the real stack: it lists that
tenant's documents only, and a tab given the other tenant's key lists the other's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.embedding.model import Embedder
from tests.fixtures.browser import chromium
from tests.fixtures.gateway_stack import InThread
from tests.fixtures.redis import RedisServer

pytestmark = pytest.mark.slow

KEYS = """
- {key: page-key-a, tenant: team-a, scopes: [read, write]}
- {key: page-key-b, tenant: team-b, scopes: [read, write]}
"""
DOCUMENTS = {
    "page-key-a": ["a/roadmap.md", "shared/notes.md"],
    "page-key-b": ["team-b/secret-salaries.md", "shared/notes.md"],
}


@pytest.fixture
def gateway(redis_server: RedisServer, embedder: Embedder, tmp_path: Path) -> Iterator[str]:
    keys = tmp_path / "keys.yaml"
    keys.write_text(KEYS)
    with InThread(redis_server.url, embedder, tmp_path, api_keys_file=str(keys)) as url:
        for key, ids in DOCUMENTS.items():
            documents = [{"id": i, "text": f"{i} of the tenant of {key}."} for i in ids]
            headers = {"Authorization": f"Bearer {key}"}
            response = httpx.post(f"{url}/v1/documents", json={"documents": documents}, headers=headers, timeout=120)
            assert response.status_code == 200, response.text
        yield url


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def listed_with(browser: Any, gateway: str, key: str) -> str:
    page = browser.new_context().new_page()  # a tab of its own: nothing kept from another key
    page.goto(f"{gateway}/")
    page.wait_for_selector("#key-form:not([hidden])", timeout=30_000)
    page.fill("#api-key", key)
    page.click("#key-use")
    page.wait_for_selector("#doc-list li", timeout=30_000)
    return str(page.inner_text("#doc-list"))


@pytest.mark.parametrize(("key", "other"), [("page-key-a", "page-key-b"), ("page-key-b", "page-key-a")])
def test_the_page_lists_only_the_documents_of_its_key_s_tenant(
    gateway: str, browser: Any, key: str, other: str
) -> None:
    listed = listed_with(browser, gateway, key)
    for document_id in DOCUMENTS[key]:
        assert document_id in listed
    for document_id in set(DOCUMENTS[other]) - set(DOCUMENTS[key]):
        assert document_id not in listed
