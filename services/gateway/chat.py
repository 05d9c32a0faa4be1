"""OpenAI's chat-completions API in front of the same retrieval and queue as /v1/ask.

Retrieval runs over the last user message; earlier turns go into the prompt, newest first, within
``RAG_CHAT_HISTORY_CHARS``; the answer is the assistant message. What OpenAI's shape has no room for
(sources, citations, grounded, timings) rides in an extra top-level field, ``ragpod``: on the completion,
or on the last chunk of a stream (the one with ``finish_reason``), before ``data: [DONE]``.

Every error under these routes is answered in OpenAI's shape, ``{"error": {"message", "type", "code"}}``,
so OpenAI clients show it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import structlog
from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import TypeAdapter, ValidationError
from starlette.responses import Response

from services.common.errors import InvalidInput, NotFound, RagError
from services.common.http import ServiceClient
from services.common.openai_schemas import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    ErrorResponse,
    Model,
    ModelList,
    Usage,
)
from services.common.queue import Event, Job, JobQueue
from services.common.schemas import Filters, SearchResponse
from services.gateway.config import Settings
from services.gateway.deps import Guarded, QueueDep, RequestIdDep, RetrieverDep, SettingsDep
from services.gateway.documents import check_question
from services.gateway.metrics import ASK_STAGE_SECONDS, UNANSWERED
from services.gateway.pipeline import (
    NOT_COVERED,
    Prepared,
    above_floor,
    admit,
    answered,
    embed_sources_early,
    follow,
    queue_full,
    raise_for_error,
    redis_errors,
)
from services.gateway.prompt import build_messages
from services.gateway.schemas import RagpodCompletion, RagpodExtra, Timings, error_responses

log = structlog.get_logger(__name__)
router = APIRouter(tags=["openai"])

OPENAI_PREFIXES = ("/v1/chat/", "/v1/models")
DEFAULT_TOP_K = 5

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def openai_error(exc: RagError, extra: Mapping[str, object]) -> Response:
    """Renders an error in OpenAI's shape; ``code`` carries the project's kind of error."""
    fields = extra.get("fields")
    param = None
    if isinstance(fields, list) and fields and isinstance(fields[0], dict):
        param = str(fields[0].get("field")) or None
    return JSONResponse(error_body(exc, param), status_code=exc.status_code, headers=exc.headers)


def error_body(exc: RagError, param: str | None = None) -> dict[str, Any]:
    status = exc.status_code
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": exc.detail, "type": kind, "param": param, "code": exc.error}}


ERROR_SHAPES = dict.fromkeys(OPENAI_PREFIXES, openai_error)
"""Path prefixes answered in OpenAI's error shape (for the app's error handlers)."""


@router.get(
    "/v1/models",
    response_model=ModelList,
    dependencies=[Guarded],
    responses=error_responses(401, 413, 429, 503, model=ErrorResponse),
    summary="The model served (OpenAI's list shape)",
)
async def list_models(settings: SettingsDep) -> ModelList:
    return ModelList(data=[Model(id=settings.served_model, owned_by="ragpod")])


@router.get(
    "/v1/models/{model_id:path}",
    response_model=Model,
    dependencies=[Guarded],
    responses=error_responses(401, 404, 413, 422, 429, 503, model=ErrorResponse),
    summary="One model, if it is the one served",
)
async def get_model(model_id: str, settings: SettingsDep) -> Model:
    if model_id != settings.served_model:
        raise NotFound(f"model {model_id!r} is not served here; GET /v1/models lists the one that is")
    return Model(id=settings.served_model, owned_by="ragpod")


_FILTERS: TypeAdapter[Filters] = TypeAdapter(Filters)


def _search_options(body: ChatCompletionRequest, settings: Settings) -> tuple[int, dict[str, Any] | None]:
    """``top_k`` and ``filters``: optional fields beside OpenAI's (an OpenAI client's ``extra_body``)."""
    extra = body.model_extra or {}
    top_k = extra.get("top_k", DEFAULT_TOP_K)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= settings.top_k_max:
        raise InvalidInput(f"top_k: must be an integer between 1 and {settings.top_k_max}")
    raw = extra.get("filters")
    if raw is None:
        return top_k, None
    try:
        filters = _FILTERS.validate_python(raw, strict=True)
    except ValidationError:
        raise InvalidInput(
            "filters: must map metadata field names (letters, digits, _ and -) to strings, integers or booleans"
        ) from None
    return top_k, dict(filters)


def question_of(messages: list[ChatMessage], settings: Settings) -> str:
    last = len(messages) - 1
    if messages[last].role != "user":
        raise InvalidInput(f"messages.{last}.role: the last message must be from the user")
    question = messages[last].text()
    if not question.strip():
        raise InvalidInput(f"messages.{last}.content: must not be empty or whitespace")
    check_question(question, 1, settings, field=f"messages.{last}.content")
    return question


def chat_prompt(messages: list[ChatMessage], sources: list[Any], settings: Settings) -> list[dict[str, str]]:
    """Our system message (plus the caller's), the newest earlier turns that fit, then sources and question."""
    system, last = build_messages(messages[-1].text(), sources, settings.max_context_chars, settings.system_prompt)
    theirs = [m.text().strip() for m in messages[:-1] if m.role in ("system", "developer") and m.text().strip()]
    if theirs:
        system = {"role": "system", "content": "\n\n".join([system["content"], *theirs])}
    history: list[dict[str, str]] = []
    budget = settings.chat_history_chars
    for message in reversed(messages[:-1]):
        if message.role not in ("user", "assistant"):
            continue
        text = message.text().strip()
        if not text:
            continue
        if len(text) > budget:
            break
        budget -= len(text)
        history.append({"role": message.role, "content": text})
    history.reverse()
    while history and history[0]["role"] == "assistant":  # an answer whose question did not fit
        history.pop(0)
    return [system, *history, last]


async def _retrieve(
    body: ChatCompletionRequest, settings: Settings, retriever: RetrieverDep, queue: QueueDep, rid: str
) -> tuple[str, SearchResponse, list[Any], float]:
    started = time.perf_counter()
    question = question_of(body.messages, settings)
    top_k, filters = _search_options(body, settings)
    with redis_errors():
        depth = await queue.depth()
    if depth >= settings.max_queue_depth:  # refuse before any work; admit() bounds the queue exactly
        raise queue_full(depth, settings)
    payload: dict[str, Any] = {"query": question, "top_k": top_k, "filters": filters}
    search = await retriever.post("/v1/search", payload, request_id=rid, model=SearchResponse)
    ASK_STAGE_SECONDS.labels("retrieve").observe(time.perf_counter() - started)
    sources = above_floor(search.hits, settings.min_relevance)
    return question, search, sources, started


@router.post(
    "/v1/chat/completions",
    response_model=RagpodCompletion,
    dependencies=[Guarded],
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "A chat completion, or OpenAI's chunk events when stream is true",
        },
        **error_responses(400, 401, 413, 422, 429, 502, 503, 504, model=ErrorResponse),
    },
    summary="OpenAI-compatible chat over the indexed documents",
)
async def chat_completions(
    body: ChatCompletionRequest,
    settings: SettingsDep,
    retriever: RetrieverDep,
    queue: QueueDep,
    rid: RequestIdDep,
) -> Any:
    question, search, sources, started = await _retrieve(body, settings, retriever, queue, rid)
    completion_id = "chatcmpl-" + uuid.uuid4().hex
    created = int(time.time())
    if not sources:
        UNANSWERED.inc()
        extra = RagpodExtra(sources=[], timings=_timings_without_job(search, started))
        if body.stream:
            return _stream_response(_static_stream(completion_id, created, body, NOT_COVERED, extra))
        return _completion(completion_id, created, body.model, NOT_COVERED, "stop", Usage.of(0, 0), extra)
    messages = chat_prompt(body.messages, sources, settings)
    deadline = time.time() + settings.ask_timeout_seconds - (time.perf_counter() - started)
    job = Job(
        messages=messages,
        deadline=deadline,
        timeout_s=deadline - time.time(),  # the caller's budget from now; workers count it on Redis' clock
        stream=body.stream,
        max_tokens=body.token_limit,
        temperature=body.temperature,
        request_id=rid,
    )
    await admit(queue, job, settings)
    embedding = embed_sources_early(sources, settings, retriever, rid)
    prepared = Prepared(job=job, sources=sources, search=search, started=started, sources_embedded=embedding)
    log.info("chat_enqueued", job_id=job.id, turns=len(messages) - 2, sources=len(sources), chars=len(question))
    if body.stream:
        return _stream_response(_chunks(queue, prepared, completion_id, created, body, settings, retriever, rid))
    async for event in follow(queue, prepared):
        if event.type in ("done", "error"):
            raise_for_error(event)
            extra = await _extra(prepared, event, settings, retriever, rid)
            return _completion(
                completion_id, created, body.model, str(event.data["answer"]), _finish(event), _usage(event), extra
            )
    raise RagError("the job's events ended without an answer")


async def _extra(
    prepared: Prepared, done: Event, settings: Settings, retriever: ServiceClient, rid: str, answer: str | None = None
) -> RagpodExtra:
    """Sources, citations and timings of an answer: the same attribution as /v1/ask."""
    full = await answered(prepared, done, settings, retriever, rid)
    return RagpodExtra(
        sources=full.sources,
        citations=full.citations,
        grounded=full.grounded,
        citation_warnings=full.citation_warnings,
        timings=full.timings,
        answer=answer,
    )


def _finish(event: Event) -> Any:
    return "length" if event.data.get("finish_reason") == "length" else "stop"


def _usage(event: Event) -> Usage:
    return Usage.of(int(event.data.get("prompt_tokens", 0) or 0), int(event.data.get("completion_tokens", 0) or 0))


def _timings_without_job(search: SearchResponse, started: float) -> Timings:
    return Timings(
        embed_ms=round(search.embed_ms, 2),
        search_ms=round(search.search_ms, 2),
        queue_ms=0.0,
        generate_ms=0.0,
        total_ms=round((time.perf_counter() - started) * 1000, 2),
    )


def _completion(
    completion_id: str, created: int, model: str, answer: str, finish: Any, usage: Usage, extra: RagpodExtra
) -> RagpodCompletion:
    return RagpodCompletion(
        id=completion_id,
        created=created,
        model=model,
        choices=[Choice(message=AssistantMessage(content=answer), finish_reason=finish)],
        usage=usage,
        ragpod=extra,
    )


def _stream_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _data(body: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: Delta,
    finish: Any = None,
    extra: RagpodExtra | None = None,
) -> str:
    chunk = ChatCompletionChunk(
        id=completion_id,
        created=created,
        model=model,
        choices=[ChunkChoice(delta=delta, finish_reason=finish)],
    )
    body = json.loads(chunk.to_json(with_usage=False))
    if extra is not None:
        body["ragpod"] = extra.model_dump(mode="json", exclude_none=True)
    return _data(body)


def _usage_chunk(completion_id: str, created: int, model: str, usage: Usage) -> str:
    chunk = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[], usage=usage)
    return _data(json.loads(chunk.to_json(with_usage=True)))


DONE = "data: [DONE]\n\n"


async def _static_stream(
    completion_id: str, created: int, body: ChatCompletionRequest, answer: str, extra: RagpodExtra
) -> AsyncIterator[str]:
    yield _chunk(completion_id, created, body.model, Delta(role="assistant", content=""))
    yield _chunk(completion_id, created, body.model, Delta(content=answer))
    yield _chunk(completion_id, created, body.model, Delta(), "stop", extra)
    if body.include_usage:
        yield _usage_chunk(completion_id, created, body.model, Usage.of(0, 0))
    yield DONE


async def _chunks(
    queue: JobQueue,
    prepared: Prepared,
    completion_id: str,
    created: int,
    body: ChatCompletionRequest,
    settings: Settings,
    retriever: ServiceClient,
    rid: str,
) -> AsyncIterator[str]:
    """The answer as OpenAI chunk events. OpenAI's stream cannot take text back: when a retried
    generation replaces what was sent, the final chunk's ``ragpod.answer`` carries the whole answer."""
    model = body.model
    yield _chunk(completion_id, created, model, Delta(role="assistant", content=""))
    attempt = 0
    sent: list[str] = []
    try:
        async for event in follow(queue, prepared):
            if event.type == "token":
                attempt = attempt or event.attempt
                if event.attempt == attempt:
                    text = str(event.data["text"])
                    sent.append(text)
                    yield _chunk(completion_id, created, model, Delta(content=text))
            elif event.type == "done":
                answer = str(event.data["answer"])
                replaced: str | None = None
                if not sent:
                    yield _chunk(completion_id, created, model, Delta(content=answer))
                elif "".join(sent) != answer:
                    replaced = answer
                    log.warning("chat_stream_replaced", attempt=event.attempt)
                extra = await _extra(prepared, event, settings, retriever, rid, replaced)
                yield _chunk(completion_id, created, model, Delta(), _finish(event), extra)
                if body.include_usage:
                    yield _usage_chunk(completion_id, created, model, _usage(event))
                yield DONE
                return
            else:
                raise_for_error(event)
    except RagError as exc:
        yield _data(error_body(exc))
        yield DONE
