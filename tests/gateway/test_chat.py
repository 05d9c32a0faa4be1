"""/v1/chat/completions and /v1/models: OpenAI's shapes, driven by the official OpenAI client.

The gateway runs under a real uvicorn server on a real Redis with a worker (scripted engine) in the same
process; the retriever is a stand-in, and so is the embedding service (attribution), with a small bag of words.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from services.gateway.app import create_app
from services.gateway.config import Settings
from services.gateway.pipeline import NOT_COVERED
from services.llm.config import Settings as LlmSettings
from services.llm.worker import Worker
from tests.fixtures.apps import in_process
from tests.fixtures.embedding import EmbeddingDouble
from tests.fixtures.engines import ScriptedEngine
from tests.fixtures.redis import RedisServer
from tests.fixtures.uvicorn_server import serving
from tests.gateway.conftest import RetrieverDouble


def bag_of_words(text: str, size: int = 64) -> list[float]:
    vector = [0.0] * size
    for word in re.findall(r"\w+", text.lower()):
        vector[int(hashlib.sha1(word.encode()).hexdigest(), 16) % size] += 1.0
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def bags_of_words(texts: list[str]) -> list[list[float]]:
    return [bag_of_words(text) for text in texts]


@dataclass
class Chat:
    settings: Settings
    retriever: RetrieverDouble
    engine: ScriptedEngine
    embedding: EmbeddingDouble = field(default_factory=lambda: EmbeddingDouble(bags_of_words))

    def app(self) -> FastAPI:
        return create_app(
            self.settings,
            retriever_transport=httpx.MockTransport(self.retriever),
            embedding_transport=self.embedding.transport(),
        )


@contextlib.asynccontextmanager
async def _worker(redis_url: str, engine: ScriptedEngine) -> AsyncIterator[None]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    worker = Worker(LlmSettings(redis_url=redis_url, llm_read_block_ms=100), engine, redis, name="chat-test-worker")
    task = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 10)
        await redis.aclose()


def _settings(redis_server: RedisServer, **overrides: object) -> Settings:
    values: dict[str, object] = {"redis_url": redis_server.url, "top_k_max": 10, "max_question_chars": 300}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def served(redis_server: RedisServer, redis_client: Redis) -> AsyncIterator[tuple[str, Chat]]:
    chat = Chat(_settings(redis_server), RetrieverDouble(), ScriptedEngine())
    app = chat.app()
    async with serving(app) as url, _worker(redis_server.url, chat.engine):
        yield url, chat


QUESTION = "When was the Zorblax first sold?"
ANSWER = f"answer to: Question: {QUESTION}"


async def test_the_openai_client_gets_a_completion_with_sources(served: tuple[str, Chat]) -> None:
    url, chat = served
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        completion = await client.chat.completions.create(
            model="any-name-at-all", messages=[{"role": "user", "content": QUESTION}], max_tokens=64, temperature=0.3
        )
    assert completion.model == "any-name-at-all"
    assert completion.object == "chat.completion"
    (choice,) = completion.choices
    assert choice.message.role == "assistant" and choice.message.content == ANSWER
    assert choice.finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == len(ANSWER.split())
    extra = (completion.model_extra or {})["ragpod"]
    assert [s["document_id"] for s in extra["sources"]] == ["zorblax", "other"]
    assert len(extra["citations"]) == 1 and extra["citations"][0]["source"] in (1, 2)
    assert isinstance(extra["grounded"], bool)
    assert set(extra["timings"]) == {"embed_ms", "search_ms", "queue_ms", "generate_ms", "total_ms"}
    (request,) = chat.engine.calls
    assert request.max_tokens == 64 and request.temperature == 0.3


async def test_the_openai_client_streams_chunks_with_ragpod_on_the_last(served: tuple[str, Chat]) -> None:
    url, _ = served
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == ANSWER
    assert len(with_choices) > 3  # token by token, not the whole answer at once
    last = with_choices[-1]
    assert last.choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert all("ragpod" not in (c.model_extra or {}) for c in chunks if c is not last)
    extra = (last.model_extra or {})["ragpod"]
    assert [s["document_id"] for s in extra["sources"]] == ["zorblax", "other"]
    assert "answer" not in extra  # nothing was replaced
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(ANSWER.split())
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].model == "m"


async def test_the_openai_client_lists_the_served_model_and_shows_errors(served: tuple[str, Chat]) -> None:
    url, _ = served
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["ragpod"]
        assert (await client.models.retrieve("ragpod")).id == "ragpod"
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("gpt-4o")
        assert "gpt-4o" in missing.value.message
        with pytest.raises(openai.UnprocessableEntityError) as invalid:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
            )
    assert "messages.1.role" in invalid.value.message
    assert isinstance(invalid.value.body, dict) and invalid.value.body["code"] == "validation_error"


async def test_extra_body_chooses_top_k(served: tuple[str, Chat]) -> None:
    url, chat = served
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        completion = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": QUESTION}], extra_body={"top_k": 1}
        )
    assert [s["document_id"] for s in (completion.model_extra or {})["ragpod"]["sources"]] == ["zorblax"]
    search = [r for r in chat.retriever.requests if r.url.path == "/v1/search"][-1]
    assert json.loads(search.content)["top_k"] == 1


@pytest.fixture
async def chat_client(redis_server: RedisServer, redis_client: Redis) -> AsyncIterator[tuple[httpx.AsyncClient, Chat]]:
    chat = Chat(_settings(redis_server, chat_history_chars=60), RetrieverDouble(), ScriptedEngine())
    app = chat.app()
    async with in_process(app) as client, _worker(redis_server.url, chat.engine):
        yield client, chat


async def test_earlier_turns_go_into_the_prompt_newest_first_within_the_budget(
    chat_client: tuple[httpx.AsyncClient, Chat],
) -> None:
    client, chat = chat_client
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "An old question that no longer fits the budget at all, sadly."},
        {"role": "assistant", "content": "An old answer."},
        {"role": "user", "content": "What is a Zorblax?"},
        {"role": "assistant", "content": "A gadget [1]."},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
    ]
    response = await client.post("/v1/chat/completions", json={"model": "m", "messages": messages})
    assert response.status_code == 200, response.text
    (request,) = chat.engine.calls
    roles = [m["role"] for m in request.messages]
    assert roles == ["system", "user", "assistant", "user"]
    system, earlier_q, earlier_a, last = request.messages
    assert system["content"].startswith(chat.settings.system_prompt) and system["content"].endswith("Answer in French.")
    assert earlier_q["content"] == "What is a Zorblax?" and earlier_a["content"] == "A gadget [1]."
    assert "[1] The Zorblax was first sold in 1987." in last["content"]
    assert last["content"].endswith(f"Question: {QUESTION}")
    search = [r for r in chat.retriever.requests if r.url.path == "/v1/search"][-1]
    assert json.loads(search.content)["query"] == QUESTION  # retrieval runs over the last user message only


async def test_a_question_no_source_covers_is_answered_without_a_job(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    chat = Chat(_settings(redis_server, min_relevance=0.95), RetrieverDouble(), ScriptedEngine())
    app = chat.app()
    async with in_process(app) as client:
        plain = await client.post(
            "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "q"}]}
        )
        streamed = await client.post(
            "/v1/chat/completions", json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "q"}]}
        )
    assert plain.json()["choices"][0]["message"]["content"] == NOT_COVERED
    assert plain.json()["ragpod"]["sources"] == [] and plain.json()["ragpod"]["grounded"] is False
    events = [line.removeprefix("data: ") for line in streamed.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == NOT_COVERED
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["ragpod"]["sources"] == []
    assert await redis_client.xlen("rag:llm:jobs") == 0 and chat.engine.calls == []


@pytest.mark.parametrize(
    ("method", "path", "payload", "status"),
    [
        ("GET", "/v1/chat/completions", None, 405),
        ("POST", "/v1/chat/completions", {"model": "m"}, 422),
        ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": " "}]}, 422),
        ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "q"}], "n": 2}, 422),
        ("POST", "/v1/chat/completions/extra", {}, 404),
        ("GET", "/v1/models/unknown", None, 404),
        ("DELETE", "/v1/models", None, 405),
    ],
)
async def test_every_error_is_in_openai_shape(
    chat_client: tuple[httpx.AsyncClient, Chat], method: str, path: str, payload: object, status: int
) -> None:
    client, _ = chat_client
    response = await client.request(method, path, json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


async def test_a_body_over_the_limit_is_a_413_in_openai_shape(redis_server: RedisServer, redis_client: Redis) -> None:
    retriever = RetrieverDouble()
    app = create_app(_settings(redis_server, max_body_bytes=2048), retriever_transport=httpx.MockTransport(retriever))
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 4000}]}
    async with in_process(app) as client:
        response = await client.post("/v1/chat/completions", json=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert retriever.requests == [] and await redis_client.xlen("rag:llm:jobs") == 0


async def test_a_failed_generation_is_an_openai_error_plain_and_streamed(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    chat = Chat(_settings(redis_server), RetrieverDouble(), ScriptedEngine(fail_times=2, retryable=False))
    app = chat.app()
    question = {"model": "m", "messages": [{"role": "user", "content": QUESTION}]}
    async with (
        serving(app) as url,
        _worker(redis_server.url, chat.engine),
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client,
    ):
        with pytest.raises(openai.APIStatusError) as plain:
            await client.chat.completions.create(**question)  # type: ignore[call-overload]
        stream = await client.chat.completions.create(**question, stream=True)  # type: ignore[call-overload]
        with pytest.raises(openai.APIError) as streamed:
            async for _ in stream:
                pass
    assert plain.value.status_code == 502
    assert isinstance(plain.value.body, dict) and plain.value.body["code"] == "generation_failed"
    assert isinstance(streamed.value.body, dict) and streamed.value.body["code"] == "generation_failed"
    assert "scripted failure" in streamed.value.message
