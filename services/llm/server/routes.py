"""The OpenAI-compatible routes of the CPU model server."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import structlog
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from services.common.openai_schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorDetail,
    ErrorResponse,
    FinishReason,
    Model,
    ModelList,
    Usage,
)
from services.llm.engine import Engine, EngineError, Generation, GenerationRequest
from services.llm.server.deps import EngineDep, SettingsDep

log = structlog.get_logger(__name__)
router = APIRouter()


def openai_error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=status))
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


def _usage(generation: Generation) -> Usage:
    return Usage.of(generation.prompt_tokens, generation.completion_tokens)


@router.get("/health", include_in_schema=False)
async def health(engine: EngineDep) -> Response:
    return Response(status_code=200 if await engine.ready() else 503)


@router.get("/v1/models", response_model=ModelList)
async def models(settings: SettingsDep) -> ModelList:
    name = settings.llm_model_name
    return ModelList(data=[Model(id=name, root=name)])


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, engine: EngineDep, settings: SettingsDep) -> Response:
    model_name = settings.llm_model_name
    if body.model != model_name:
        return openai_error(404, f"The model `{body.model}` does not exist.", "NotFoundError", "model")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    request = GenerationRequest(
        messages=messages,
        max_tokens=body.token_limit or settings.llm_max_new_tokens,
        temperature=settings.llm_temperature if body.temperature is None else body.temperature,
        repetition_penalty=body.repetition_penalty or 1.0,
        stop=body.stop_strings,
    )
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        template = ChatCompletionChunk(id=completion_id, created=created, model=model_name, choices=[])
        return EventSourceResponse(
            _stream(engine, request, template, body.include_usage),
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            sep="\n",
        )
    try:
        generation = await engine.generate(request)
    except EngineError as exc:
        log.warning("llm_server_generation_failed", error=str(exc))
        return openai_error(503 if exc.retryable else 500, str(exc), "InternalServerError")
    completion = ChatCompletion(
        id=completion_id,
        created=created,
        model=model_name,
        choices=[Choice(message=AssistantMessage(content=generation.text), finish_reason=generation.finish_reason)],
        usage=_usage(generation),
    )
    return JSONResponse(completion.model_dump(mode="json"))


async def _stream(
    engine: Engine, request: GenerationRequest, template: ChatCompletionChunk, include_usage: bool
) -> AsyncIterator[str]:
    """Chunks as the tokens come; a client that goes away cancels its generation."""
    deltas: asyncio.Queue[str | None] = asyncio.Queue()

    async def on_token(text: str) -> None:
        deltas.put_nowait(text)

    task = asyncio.create_task(engine.generate(request, on_token))
    task.add_done_callback(lambda _: deltas.put_nowait(None))

    def chunk(delta: Delta, finish: FinishReason | None = None) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish)
        return template.model_copy(update={"choices": [choice]}).to_json(with_usage=include_usage)

    try:
        yield chunk(Delta(role="assistant", content=""))
        while (text := await deltas.get()) is not None:
            yield chunk(Delta(content=text))
        try:
            generation = task.result()
        except Exception as exc:  # the status line is sent: the failure goes in the stream, as vLLM does
            log.warning("llm_server_generation_failed", error=str(exc), error_type=type(exc).__name__)
            error = ErrorResponse(error=ErrorDetail(message=str(exc), type="InternalServerError", code=500))
            yield error.model_dump_json()
            yield "[DONE]"
            return
        yield chunk(Delta(), generation.finish_reason)
        if include_usage:
            last = template.model_copy(update={"choices": [], "usage": _usage(generation)})
            yield last.to_json(with_usage=True)
        yield "[DONE]"
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, EngineError):
                await task
