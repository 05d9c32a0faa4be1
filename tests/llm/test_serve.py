"""``python -m services.llm.server``: the OpenAI-compatible API, in process and as a real server with the real model.

The in-process tests check the API's shape with the scripted engine; the slow
ones start the real server (tests/fixtures/llm.py) and drive it through the
worker's own ``openai`` engine, which is how the worker uses it in production
(against vLLM on a GPU, against this server on a CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import httpx2
import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from services.llm.config import Settings
from services.llm.engine import EngineError, GenerationRequest
from services.llm.openai_engine import OpenAIEngine
from services.llm.server.app import create_app
from services.llm.server.config import Settings as ServerSettings
from tests.fixtures.apps import in_process
from tests.fixtures.engines import ScriptedEngine
from tests.fixtures.llm import MODEL_NAME, LlmServer

SETTINGS = ServerSettings(llm_model_name="scripted-model")
CHAT = {"model": "scripted-model", "messages": [{"role": "user", "content": "what is a zorblax?"}], "max_tokens": 8}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with in_process(create_app(SETTINGS, ScriptedEngine()), "http://server") as client:
        yield client


@contextlib.asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[ASGIApp]:
    """The app with its lifespan run and its state in every request, for the SDK's own (httpx2) transport."""
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
            await app({**scope, "state": dict(state or {})}, receive, send)

        yield with_state


def data_lines(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


async def test_models_and_health(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["scripted-model"]
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).json()["checks"] == {"engine": "ok"}


async def test_chat_completion(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/chat/completions", json=CHAT)).json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "scripted-model"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "answer to: what is a zorblax?"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16}


async def test_streamed_chat_completion(client: httpx.AsyncClient) -> None:
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    response = await client.post("/v1/chat/completions", json=request)
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = data_lines(response.text)
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "answer to: what is a zorblax?"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_decoding_settings_reach_the_engine() -> None:
    """The worker's stop strings and repetition penalty, as vLLM takes them, reach the CPU server's engine."""
    engine = ScriptedEngine()
    async with in_process(create_app(SETTINGS, engine), "http://server") as client:
        body = {**CHAT, "stop": "\n\n", "repetition_penalty": 1.2}
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        refused = await client.post("/v1/chat/completions", json={**CHAT, "repetition_penalty": 0.5})
    assert (engine.calls[0].stop, engine.calls[0].repetition_penalty) == (("\n\n",), 1.2)
    assert refused.status_code == 400 and "repetition_penalty" in refused.text


async def test_unknown_model_is_404_like_vllm(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "The model `gpt-9` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


@pytest.mark.parametrize(
    ("change", "param"),
    [({"messages": []}, "messages"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": 3}, "temperature")],
    ids=["no-messages", "max-tokens", "temperature"],
)
async def test_invalid_request_is_400_in_openai_shape(
    client: httpx.AsyncClient, change: dict[str, Any], param: str
) -> None:
    response = await client.post("/v1/chat/completions", json={**CHAT, **change})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["param"] == param and error["code"] == 400
    assert param in error["message"]


async def test_failure_while_streaming_is_reported_in_the_stream() -> None:
    async with served(create_app(SETTINGS, ScriptedEngine(fail_times=1, retryable=False))) as app:
        engine = OpenAIEngine(
            Settings(llm_openai_url="http://server/v1", llm_model_name="scripted-model"),
            transport=httpx2.ASGITransport(app=app),
        )

        async def on_token(_: str) -> None:
            pass

        request = GenerationRequest(CHAT["messages"], max_tokens=8)  # type: ignore[arg-type]
        with pytest.raises(EngineError, match="scripted failure 1"):
            await engine.generate(request, on_token)
        # The next request works: one failure does not take the server down.
        seen: list[str] = []

        async def collect(text: str) -> None:
            seen.append(text)

        generation = await engine.generate(request, collect)
        assert "".join(seen) == generation.text == "answer to: what is a zorblax?"
        await engine.close()


# --- the real server, with the real model -----------------------------------------------------------------


def real_engine(server: LlmServer, model: str = MODEL_NAME) -> OpenAIEngine:
    return OpenAIEngine(Settings(llm_openai_url=server.url, llm_model_name=model, llm_concurrency=4))


QUESTION = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]


def batch_sizes(metrics: str) -> tuple[float, float]:
    """(sum, count) of rag_llm_engine_batch_size: sequences decoded, batches run."""
    found = dict(re.findall(r"^rag_llm_engine_batch_size_(sum|count) (\S+)$", metrics, re.MULTILINE))
    return float(found["sum"]), float(found["count"])


@pytest.mark.slow
async def test_real_server_answers_whole_and_streamed(llm_server: LlmServer) -> None:
    engine = real_engine(llm_server)
    try:
        assert await engine.ready()
        whole = await engine.generate(GenerationRequest(QUESTION, max_tokens=12))
        assert "Paris" in whole.text
        assert 0 < whole.completion_tokens <= 12 and whole.prompt_tokens > 10

        tokens: list[str] = []

        async def on_token(text: str) -> None:
            tokens.append(text)

        streamed = await engine.generate(GenerationRequest(QUESTION, max_tokens=12), on_token)
        assert len(tokens) > 1
        assert "".join(tokens).strip() == streamed.text
        assert streamed.text == whole.text  # greedy: the same answer either way
        assert streamed.completion_tokens == whole.completion_tokens
    finally:
        await engine.close()


@pytest.mark.slow
async def test_real_server_batches_concurrent_requests(llm_server: LlmServer) -> None:
    engine = real_engine(llm_server)
    before = batch_sizes(await asyncio.to_thread(llm_server.metrics))
    try:
        questions = [[{"role": "user", "content": f"Name a colour. Request {i}."}] for i in range(4)]
        answers = await asyncio.gather(*(engine.generate(GenerationRequest(q, max_tokens=6)) for q in questions))
    finally:
        await engine.close()
    after = batch_sizes(await asyncio.to_thread(llm_server.metrics))
    sequences, batches = after[0] - before[0], after[1] - before[1]
    assert all(a.completion_tokens > 0 for a in answers)
    assert sequences == 4
    assert batches < sequences  # at least two of the four were decoded together


@pytest.mark.slow
async def test_real_server_refuses_an_unknown_model(llm_server: LlmServer) -> None:
    engine = real_engine(llm_server, model="no-such-model")
    try:
        assert not await engine.ready()
        with pytest.raises(EngineError) as caught:
            await engine.generate(GenerationRequest(QUESTION, max_tokens=4))
        assert caught.value.retryable is False
        assert "404" in str(caught.value) and "does not exist" in str(caught.value)
    finally:
        await engine.close()
