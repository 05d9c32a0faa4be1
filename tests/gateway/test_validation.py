"""Every 422 of the public API names the field, and a rejected request leaves nothing behind."""

from __future__ import annotations

import json
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
    # Ids a URL cannot address: refused when they are sent, not found unreachable later.
    ({"documents": [{"id": ".", "text": "t"}]}, "documents.0.id"),
    ({"documents": [{"id": "..", "text": "t"}]}, "documents.0.id"),
    ({"documents": [{"id": "../../etc/passwd.md", "text": "t"}]}, "documents.0.id"),
    ({"documents": [{"id": "ok", "text": "t"}, {"id": "a\nb", "text": "t"}]}, "documents.1.id"),
    ({"documents": [{"id": "tab\there", "text": "t"}]}, "documents.0.id"),
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


# JSON as a client sends it, with a lone surrogate spelled as an escape (json.dumps would write it the same way).
LONE = "\\ud800"
UNICODE_CASES = [
    ("/v1/ask", '{"question": "q' + LONE + '"}', "question"),
    ("/v1/documents", '{"documents": [{"id": "a", "text": "t", "metadata": {"k": "v' + LONE + '"}}]}',
     "documents.0.metadata.k"),
    ("/v1/documents", '{"documents": [{"id": "a", "text": "t", "metadata": {"k' + LONE + '": 1}}]}',
     "documents.0.metadata.k\\ud800"),
    ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "hi' + LONE + '"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", '{"model": "m' + LONE + '", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/v1/chat/completions",
     '{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "' + LONE + '"}]}]}',
     "messages.0.content.0.text"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "field"), UNICODE_CASES)
async def test_a_lone_surrogate_anywhere_in_a_body_is_a_422_naming_its_field(
    gateway: Gateway, path: str, body: str, field: str
) -> None:
    response = await gateway.client.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    if path.startswith("/v1/chat/"):
        error = response.json()["error"]
        assert error["code"] == "validation_error" and error["param"] == field
        assert error["message"].startswith(f"{field}: must be valid Unicode")
    else:
        assert response.json()["detail"].startswith(f"{field}: must be valid Unicode"), response.text
    assert gateway.retriever.requests == []
    assert await gateway.redis.xlen("rag:llm:jobs") == 0


async def test_a_lone_surrogate_in_the_files_metadata_is_a_422(gateway: Gateway) -> None:
    response = await gateway.client.post(
        "/v1/files", files={"files": ("a.txt", b"alpha")}, data={"metadata": '{"team": "' + LONE + '"}'}
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("metadata.team: must be valid Unicode")
    assert gateway.retriever.requests == []


async def test_a_surrogate_pair_is_a_character_and_passes(gateway: Gateway) -> None:
    body = '{"documents": [{"id": "a", "text": "smile \\ud83d\\ude00", "metadata": {"k": "\\\\ud800"}}]}'
    response = await gateway.client.post(
        "/v1/documents", content=body.encode(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text
    sent = json.loads(gateway.retriever.requests[0].content)["documents"][0]
    assert sent["text"] == "smile \U0001f600" and sent["metadata"] == {"k": "\\ud800"}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ]}]},
            "messages.0.content.1",
        ),
    ],
)  # fmt: skip
async def test_chat_with_tools_or_images_is_a_400_saying_they_are_not_supported(
    gateway: Gateway, extra: dict[str, Any], field: str
) -> None:
    body = {"model": "ragpod", "messages": [{"role": "user", "content": "When was the Zorblax sold?"}], **extra}
    response = await gateway.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_request" and error["message"].startswith(f"{field}: ")
    assert "not supported" in error["message"]
    assert gateway.retriever.requests == []
    assert await gateway.redis.xlen("rag:llm:jobs") == 0


async def test_a_file_id_a_url_cannot_address_is_a_422(gateway: Gateway) -> None:
    response = await gateway.client.post("/v1/files", files={"files": ("a.txt", b"alpha")}, data={"id": "docs/../a"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("files.0 (a.txt): id: ")
    assert gateway.retriever.requests == []
