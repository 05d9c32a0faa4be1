"""``python -m services.llm.serve``: the project's CPU engine behind vLLM's OpenAI-compatible API.

On a GPU the worker talks to vLLM's own server (``vllm serve``); on a CPU-only
cluster, and in the tests, it talks to this one instead, over the same API, so
the worker has one code path (``RAG_LLM_BACKEND=openai``) for both.

The subset of the API served is the one the worker relies on (see
``services.llm.openai`` and ``docs/llm-serving.md``):

- ``POST /v1/chat/completions``: ``model``, ``messages``, ``max_tokens`` (or
  ``max_completion_tokens``), ``temperature``, ``stream``,
  ``stream_options.include_usage``; other OpenAI fields are accepted and
  ignored. Streaming answers are ``chat.completion.chunk`` objects as
  server-sent ``data:`` lines, a usage chunk when asked for, then
  ``data: [DONE]``.
- ``GET /v1/models`` lists the one served model (``RAG_LLM_MODEL_NAME``, like
  vLLM's ``--served-model-name``); another name in a request answers 404 as
  vLLM does.
- ``GET /health`` (vLLM's path), and ``/healthz``, ``/readyz``, ``/metrics`` like
  every service here.

Concurrent requests are decoded together by the local engine's batcher (up to
``RAG_LLM_CONCURRENCY`` sequences, vLLM's ``--max-num-seqs``); its batch sizes
are in ``rag_llm_engine_batch_size``. The model loads before the port opens,
as with vLLM. Errors use OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``; validation errors answer 400, as vLLM's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from services.common.app import add_common_routes
from services.common.metrics import MODEL_INFO
from services.common.serve import run
from services.llm.config import Settings
from services.llm.engine import Engine, EngineError, Generation, GenerationRequest

log = structlog.get_logger(__name__)
SERVICE = "llm-server"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # the rest of OpenAI's fields: accepted, ignored

    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    n: int = Field(1, ge=1, le=1, description="One choice per request, as the worker asks.")
    stream: bool = False
    stream_options: StreamOptions | None = None


def openai_error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status
    )


def _usage(generation: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The server app; ``engine`` defaults to the local engine, loaded (and closed) by the lifespan."""
    owned = engine is None
    if engine is None:
        from services.llm.local import LocalEngine

        engine = LocalEngine(settings)
    served: Engine = engine

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not await served.ready():
            await served.start()
        MODEL_INFO.labels(SERVICE, served.model_name, served.device).set(1)
        log.info("llm_server_ready", model=settings.llm_model_name, device=served.device)
        try:
            yield
        finally:
            if owned:
                await served.close()

    app = FastAPI(title="ragpod llm server (OpenAI-compatible)", version="0.1.0", lifespan=lifespan)
    app.state.engine = served
    model_name = settings.llm_model_name

    async def readiness(app: FastAPI) -> dict[str, str]:
        return {"engine": "ok" if await served.ready() else "model not loaded"}

    add_common_routes(app, SERVICE, readiness)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg', 'invalid value')}"
            for e in exc.errors()
        )
        return openai_error(400, message or "invalid request", "BadRequestError", param)

    @app.get("/health", include_in_schema=False)
    async def health() -> Response:
        ready = await served.ready()
        return Response(status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "ragpod", "root": model_name}],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> Response | dict[str, Any]:
        if body.model != model_name:
            return openai_error(404, f"The model `{body.model}` does not exist.", "NotFoundError", "model")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        request = GenerationRequest(
            messages=messages,
            max_tokens=body.max_completion_tokens or body.max_tokens or settings.llm_max_new_tokens,
            temperature=settings.llm_temperature if body.temperature is None else body.temperature,
        )
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(served, request, completion_id, created, model_name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            generation = await served.generate(request)
        except EngineError as exc:
            log.warning("llm_server_generation_failed", error=str(exc))
            return openai_error(503 if exc.retryable else 500, str(exc), "InternalServerError")
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": generation.text},
                    "logprobs": None,
                    "finish_reason": generation.finish_reason,
                }
            ],
            "usage": _usage(generation),
        }

    return app


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


async def _stream(
    engine: Engine, request: GenerationRequest, completion_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """Chunks as the tokens come; a client that goes away cancels its generation."""
    deltas: asyncio.Queue[str | None] = asyncio.Queue()

    async def on_token(text: str) -> None:
        deltas.put_nowait(text)

    task = asyncio.create_task(engine.generate(request, on_token))
    task.add_done_callback(lambda _: deltas.put_nowait(None))

    def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None
        return body

    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        while (text := await deltas.get()) is not None:
            yield _sse(chunk({"content": text}))
        try:
            generation = task.result()
        except Exception as exc:  # the status line is sent: the failure goes in the stream, as vLLM does
            log.warning("llm_server_generation_failed", error=str(exc), error_type=type(exc).__name__)
            yield _sse({"error": {"message": str(exc), "type": "InternalServerError", "param": None, "code": 500}})
            yield _sse("[DONE]")
            return
        yield _sse(chunk({}, generation.finish_reason))
        if include_usage:
            yield _sse(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(generation),
                }
            )
        yield _sse("[DONE]")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, EngineError):
                await task


def main() -> None:
    settings = Settings()
    served = settings.model_copy(update={"port": settings.llm_serve_port})
    run(SERVICE, served, lambda: create_app(served))


if __name__ == "__main__":
    main()
