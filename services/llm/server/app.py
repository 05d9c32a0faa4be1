"""The CPU model server's app: the local engine behind vLLM's OpenAI-compatible API.

On a GPU the worker talks to vLLM's own server (``vllm serve``); on a CPU-only
cluster, and in the tests, it talks to this one instead, over the same API, so
the worker has one code path (``RAG_LLM_BACKEND=openai``) for both.

The subset of the API served is the one the worker relies on (see
``services.llm.openai_engine`` and ``docs/llm-serving.md``):

- ``POST /v1/chat/completions``: ``model``, ``messages``, ``max_tokens`` (or
  ``max_completion_tokens``), ``temperature``, ``stream``,
  ``stream_options.include_usage``; other OpenAI fields are accepted and
  ignored. Streaming answers are ``chat.completion.chunk`` objects as
  server-sent events (``sse-starlette``), a usage chunk when asked for, then
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
from collections.abc import AsyncIterator
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from services.common.app import OK, Checks, add_common_routes
from services.common.deps import lifespan_state
from services.common.gpu import sample_forever
from services.common.metrics import MODEL_INFO
from services.llm.engine import Engine
from services.llm.server.config import Settings
from services.llm.server.deps import EngineDep, State
from services.llm.server.routes import openai_error, router

log = structlog.get_logger(__name__)
SERVICE = "llm-server"


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The server app; ``engine`` defaults to the local engine, loaded (and closed) by the lifespan."""
    owned = engine is None
    if engine is None:
        from services.llm.local import LocalEngine

        engine = LocalEngine(settings.local_options())
    served: Engine = engine

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        if not await served.ready():
            await served.start()
        MODEL_INFO.labels(SERVICE, served.model_name, served.device).set(1)
        log.info("llm_server_ready", model=settings.llm_model_name, device=served.device)
        gpu_task = asyncio.create_task(sample_forever())
        try:
            yield lifespan_state(State(settings=settings, engine=served))
        finally:
            gpu_task.cancel()
            if owned:
                await served.close()

    app = FastAPI(title="ragpod llm server (OpenAI-compatible)", version="0.1.0", lifespan=lifespan)

    async def readiness(engine: EngineDep) -> Checks:
        return {"engine": OK if await engine.ready() else "model not loaded"}

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

    app.include_router(router)
    return app
