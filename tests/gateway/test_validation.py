"""Every 422 of the public API names the field, and a rejected request leaves nothing behind."""

from __future__ import annotations

from typing import Any

import pytest

from tests.gateway.conftest import Gateway

ASK_CASES = [
    ({"question": ""}, "question"),
    ({"question": "   \t\n"}, "question"),
    ({"question": 42}, "question"),
    ({}, "question"),
    ({"question": "q", "top_k": 0}, "top_k"),
    ({"question": "q", "top_k": 11}, "top_k"),
    ({"question": "q", "top_k": "many"}, "top_k"),
    ({"question": "q" * 301}, "question"),
    ({"question": "q", "filters": {"k": {"nested": 1}}}, "filters.k"),
    ({"question": "q", "stream": "perhaps"}, "stream"),
]

DOCUMENT_CASES = [
    ({"documents": []}, "documents"),
    ({}, "documents"),
    ({"documents": "text"}, "documents"),
    ({"documents": [{"id": "a", "text": ""}]}, "documents.0.text"),
    ({"documents": [{"id": "a", "text": "ok"}, {"id": "b", "text": "   "}]}, "documents.1.text"),
    ({"documents": [{"id": "a"}]}, "documents.0.text"),
    ({"documents": [{"id": "", "text": "t"}]}, "documents.0.id"),
    ({"documents": [{"id": 3, "text": "t"}]}, "documents.0.id"),
    ({"documents": [{"id": "a", "text": "t", "metadata": "m"}]}, "documents.0.metadata"),
    ({"documents": [{"id": "a", "text": "t"}, {"id": "a", "text": "u"}]}, "documents"),
    ({"documents": [{"id": str(i), "text": "t"} for i in range(4)]}, "documents"),
]


@pytest.mark.parametrize(("payload", "field"), ASK_CASES)
async def test_bad_ask_is_422_naming_the_field(gateway: Gateway, payload: dict[str, Any], field: str) -> None:
    response = await gateway.client.post("/v1/ask", json=payload)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "validation_error"
    assert body["detail"].startswith(f"{field}:"), body["detail"]
    assert gateway.retriever.requests == []
    assert gateway.engine.calls == []
    assert await gateway.redis.xlen("rag:llm:jobs") == 0


@pytest.mark.parametrize(("payload", "field"), DOCUMENT_CASES)
async def test_bad_documents_are_422_naming_the_field(gateway: Gateway, payload: dict[str, Any], field: str) -> None:
    response = await gateway.client.post("/v1/documents", json=payload)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(f"{field}:"), response.json()["detail"]
    assert gateway.retriever.requests == []  # nothing reached the index


async def test_malformed_json_is_422(gateway: Gateway) -> None:
    response = await gateway.client.post("/v1/ask", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert "stack" not in response.text.lower() and "traceback" not in response.text.lower()
