"""The bridge to an OpenAI-compatible server: what it sends, and how each way of failing is classed.

The answers here are scripted with a mock transport of httpx2 (the HTTP client
under the ``openai`` SDK), shaped as vLLM sends them; tests/llm/test_serve.py
runs the same engine against a real server.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx2 as httpx
import pytest

from services.llm.config import Settings
from services.llm.engine import EngineError, GenerationRequest
from services.llm.openai_engine import OpenAIEngine

REQUEST = GenerationRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0.0)


def engine_with(handler: Callable[[httpx.Request], httpx.Response]) -> OpenAIEngine:
    settings = Settings(llm_openai_url="http://model/v1", llm_model_name="m", llm_concurrency=2)
    return OpenAIEngine(settings, transport=httpx.MockTransport(handler))


def sse(*chunks: object) -> httpx.Response:
    body = "".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks)
    return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


def delta(text: str, finish: str | None = None) -> dict[str, object]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


async def test_request_fields_and_non_streaming_answer() -> None:
    sent: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        sent.append(json.loads(request.content))
        return httpx.Response(
            200,
            json={
                "choices": [{"message": {"role": "assistant", "content": " Paris. "}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 8},
            },
        )

    generation = await engine_with(handler).generate(REQUEST)
    assert sent == [{"model": "m", "messages": REQUEST.messages, "max_tokens": 8, "temperature": 0.0, "stream": False}]
    assert (generation.text, generation.completion_tokens, generation.prompt_tokens) == ("Paris.", 8, 5)
    assert generation.finish_reason == "length"


async def test_decoding_settings_are_sent_as_vllm_reads_them() -> None:
    """``stop`` is OpenAI's field; ``repetition_penalty`` is vLLM's extra sampling parameter, at the top level."""
    sent: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"message": {"content": "Paris."}, "finish_reason": "stop"}]})

    request = GenerationRequest(REQUEST.messages, max_tokens=8, repetition_penalty=1.2, stop=("\n\n",))
    await engine_with(handler).generate(request)
    assert sent[0]["stop"] == ["\n\n"]
    assert sent[0]["repetition_penalty"] == 1.2


async def test_streaming_passes_each_delta_on_and_reads_the_usage_chunk() -> None:
    sent: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return sse(
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
            delta("Par"),
            delta("is", "stop"),
            {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
            "[DONE]",
        )

    seen: list[str] = []

    async def on_token(text: str) -> None:
        seen.append(text)

    generation = await engine_with(handler).generate(REQUEST, on_token)
    assert sent[0]["stream"] is True and sent[0]["stream_options"] == {"include_usage": True}
    assert seen == ["Par", "is"]
    assert (generation.text, generation.completion_tokens, generation.finish_reason) == ("Paris", 2, "stop")


@pytest.mark.parametrize(
    ("response", "retryable", "words"),
    [
        (httpx.Response(400, json={"error": {"message": "bad max_tokens"}}), False, "400"),
        (httpx.Response(404, json={"error": {"message": "The model `m` does not exist."}}), False, "does not exist"),
        (httpx.Response(429, text="slow down"), True, "429"),
        (httpx.Response(503, text="loading"), True, "503"),
        (httpx.Response(200, text="not json"), True, "malformed"),
        (httpx.Response(200, json={"choices": []}), True, "malformed"),
    ],
    ids=["400", "404", "429", "503", "not-json", "no-choices"],
)
async def test_http_failures_are_classed(response: httpx.Response, retryable: bool, words: str) -> None:
    with pytest.raises(EngineError) as caught:
        await engine_with(lambda _: response).generate(REQUEST)
    assert caught.value.retryable is retryable
    assert words in str(caught.value)


@pytest.mark.parametrize(
    ("response", "words"),
    [
        (
            sse(delta("Par"), {"error": {"message": "engine died", "type": "InternalServerError"}}, "[DONE]"),
            "engine died",
        ),
        (sse(delta("Par"), {"object": "error", "message": "old style", "code": 500}, "[DONE]"), "old style"),
        (sse(delta("Par"), delta("is")), "before [DONE]"),
        (sse(delta("Par"), "{broken"), "malformed"),
        (httpx.Response(500, text="boom"), "500"),
    ],
    ids=["error-chunk", "old-error-chunk", "cut-short", "broken-chunk", "500"],
)
async def test_stream_failures_are_errors_not_short_answers(response: httpx.Response, words: str) -> None:
    async def on_token(_: str) -> None:
        pass

    with pytest.raises(EngineError) as caught:
        await engine_with(lambda _: response).generate(REQUEST, on_token)
    assert caught.value.retryable is True
    assert words in str(caught.value)


async def test_unreachable_server_is_retryable_and_not_a_try() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(EngineError) as caught:
        await engine_with(refuse).generate(REQUEST)
    assert caught.value.retryable is True
    assert caught.value.unreachable is True  # nothing reached the server: the worker counts no try
    assert "unreachable" in str(caught.value)


async def test_connection_lost_after_sending_is_a_try() -> None:
    def cut(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset", request=request)

    with pytest.raises(EngineError) as caught:
        await engine_with(cut).generate(REQUEST)
    assert caught.value.retryable is True
    assert caught.value.unreachable is False  # the server may have started on it: counted like any failure


@pytest.mark.parametrize(
    ("response", "ready"),
    [
        (httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]}), True),
        (httpx.Response(200, json={"object": "list", "data": [{"id": "other"}]}), False),
        (httpx.Response(503, text="loading"), False),
        (httpx.Response(200, text="<html>"), False),
    ],
    ids=["served", "other-model", "loading", "not-json"],
)
async def test_ready_means_the_model_is_served(response: httpx.Response, ready: bool) -> None:
    assert await engine_with(lambda _: response).ready() is ready
