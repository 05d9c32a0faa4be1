"""The gateway's web page in a real headless Chromium: ask, watch the answer stream in, see the sources."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ragpod.supervisor import Stack
from tests.fixtures.browser import chromium

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DOC = {
    "id": "marrow-clock",
    "text": "The Marrowgate clock tower in Pellbridge was built by the clockmaker Ilse Varnstrom in 1873.",
}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as browser:
        yield browser


def test_asking_on_the_web_page_streams_an_answer_with_sources(
    stack: Stack, browser: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    gateway = f"http://127.0.0.1:{stack.ports['gateway']}"
    assert httpx.post(f"{gateway}/v1/documents", json={"documents": [DOC]}, timeout=60).status_code == 200
    page = browser.new_page()
    page.goto(f"{gateway}/")
    page.fill("#question", "Who built the Marrowgate clock tower?")
    with page.expect_response(f"{gateway}/v1/ask") as asked:
        page.click("#go")
    assert asked.value.headers["content-type"].startswith("text/event-stream")
    # A generous bound for a shared, busy machine: this waits for the answer, it does not time it.
    page.wait_for_selector("#timings:has-text('total')", timeout=300_000)
    answer = page.inner_text("#answer")
    answer_class = page.get_attribute("#answer", "class") or ""
    sources = page.locator(".source").all_inner_texts()
    shot = Path(tmp_path_factory.mktemp("web")) / "ask.png"
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    assert answer.strip() and "error" not in answer_class
    assert sources and sources[0].startswith("[1] marrow-clock")
