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
from typing import Any, Literal

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError
from sse_starlette import EventSourceResponse
from starlette.responses import Response

from services.common.disconnect import unless_disconnected
from services.common.errors import BadRequest, InvalidInput, NotFound, RagError
from services.common.openai_schemas import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorResponse,
    Model,
    ModelList,
    Usage,
)
from services.common.schemas import Filters
from services.gateway import pipeline
from services.gateway.config import Settings
from services.gateway.deps import ClientsDep, Reader, RequestIdDep, SettingsDep
from services.gateway.pipeline import Answer, Pending, Question, Reset
from services.gateway.prompt import Conversation
from services.gateway.schemas import RagpodCompletion, RagpodExtra, error_responses

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
    dependencies=[Reader],
    responses=error_responses(401, 403, 413, 429, 503, model=ErrorResponse),
    summary="The model served (OpenAI's list shape)",
)
async def list_models(settings: SettingsDep) -> ModelList:
    return ModelList(data=[Model(id=settings.served_model, owned_by="ragpod")])


@router.get(
    "/v1/models/{model_id:path}",
    response_model=Model,
    dependencies=[Reader],
    responses=error_responses(401, 403, 404, 413, 422, 429, 503, model=ErrorResponse),
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


# OpenAI request fields asking for what this API does not do: refused, so a client is not silently ignored.
_UNSUPPORTED_FIELDS = ("tools", "functions", "tool_choice", "function_call")


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    """Tools and non-text content parts (images, audio, files) are a 400 naming the field."""
    extra = body.model_extra or {}
    for name in _UNSUPPORTED_FIELDS:
        if extra.get(name) not in (None, [], "none"):
            raise BadRequest(f"{name}: tools and function calling are not supported; answers come from the documents")
    for index, message in enumerate(body.messages):
        if isinstance(message.content, list):
            for part_index, part in enumerate(message.content):
                if part.get("type") != "text":
                    raise BadRequest(
                        f"messages.{index}.content.{part_index}: content parts of type {str(part.get('type'))!r} "
                        "are not supported; send text"
                    )


def question_of(body: ChatCompletionRequest, settings: Settings) -> Question:
    """The last message is the question; the caller's system messages and the earlier turns come along."""
    _refuse_unsupported(body)
    messages = body.messages
    last = len(messages) - 1
    if messages[last].role != "user":
        raise InvalidInput(f"messages.{last}.role: the last message must be from the user")
    top_k, filters = _search_options(body, settings)
    earlier = messages[:-1]
    turns: list[tuple[Literal["user", "assistant"], str]] = []
    for message in earlier:
        text = message.text().strip()
        if text and message.role in ("user", "assistant"):
            turns.append(("user" if message.role == "user" else "assistant", text))
    conversation = Conversation(
        system=[m.text().strip() for m in earlier if m.role in ("system", "developer") and m.text().strip()],
        turns=turns,
        history_chars=settings.chat_history_chars,
    )
    return Question(
        messages[last].text(),
        top_k,
        filters,
        field=f"messages.{last}.content",
        conversation=conversation,
        stream=body.stream,
        max_tokens=body.token_limit,
        temperature=body.temperature,
    )


@router.post(
    "/v1/chat/completions",
    response_model=RagpodCompletion,
    dependencies=[Reader],
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "A chat completion, or OpenAI's chunk events when stream is true",
        },
        **error_responses(400, 401, 403, 413, 422, 429, 502, 503, 504, model=ErrorResponse),
    },
    summary="OpenAI-compatible chat over the indexed documents",
)
async def chat_completions(
    body: ChatCompletionRequest, settings: SettingsDep, clients: ClientsDep, rid: RequestIdDep, request: Request
) -> Any:
    pending = await pipeline.ask(question_of(body, settings), settings, clients, rid)
    completion = Completion("chatcmpl-" + uuid.uuid4().hex, int(time.time()), body.model, body.include_usage)
    if body.stream:
        return EventSourceResponse(_chunks(pending, completion), headers=SSE_HEADERS, sep="\n")
    answer = await unless_disconnected(request, pending.answer())  # a client gone first cancels it: 499
    return RagpodCompletion(
        id=completion.id,
        created=completion.created,
        model=completion.model,
        choices=[Choice(message=AssistantMessage(content=answer.response.answer), finish_reason=_finish(answer))],
        usage=_usage(answer),
        ragpod=_extra(answer),
    )


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _extra(answer: Answer, replaced: str | None = None) -> RagpodExtra:
    """Sources, citations and timings of an answer: the body of /v1/ask, in the field OpenAI's shape lacks."""
    full = answer.response
    return RagpodExtra(
        sources=full.sources,
        citations=full.citations,
        grounded=full.grounded,
        answer_kind=full.answer_kind,
        citation_warnings=full.citation_warnings,
        warnings=full.warnings,
        timings=full.timings,
        answer=replaced,
    )


def _finish(answer: Answer) -> Any:
    return "length" if answer.finish_reason == "length" else "stop"


def _usage(answer: Answer) -> Usage:
    return Usage.of(answer.prompt_tokens, answer.completion_tokens)


class Completion:
    """What every chunk of one streamed completion repeats."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self.id, self.created, self.model, self.include_usage = completion_id, created, model, include_usage

    def chunk(self, delta: Delta, finish: Any = None, extra: RagpodExtra | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[ChunkChoice(delta=delta, finish_reason=finish)]
        )
        if extra is None:
            return chunk.to_json(with_usage=False)
        body = json.loads(chunk.to_json(with_usage=False))
        body["ragpod"] = extra.model_dump(mode="json", exclude_none=True)
        return json.dumps(body, separators=(",", ":"))

    def usage(self, usage: Usage) -> str:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage).to_json(
            with_usage=True
        )


DONE = "[DONE]"


async def _chunks(pending: Pending, completion: Completion) -> AsyncIterator[str]:
    """The answer as OpenAI chunk events (the data of each; sse-starlette frames them). OpenAI's stream cannot
    take text back: once a retried generation starts over, no more tokens are sent, and the final chunk's
    ``ragpod.answer`` carries the whole answer when it differs from what was sent."""
    yield completion.chunk(Delta(role="assistant", content=""))
    sent: list[str] = []
    restarted = False
    try:
        async for item in pending.stream():
            if isinstance(item, Answer):
                replaced: str | None = None
                if "".join(sent) != item.response.answer:
                    replaced = item.response.answer
                    log.warning("chat_stream_replaced")
                yield completion.chunk(Delta(), _finish(item), _extra(item, replaced))
                if completion.include_usage:
                    yield completion.usage(_usage(item))
                yield DONE
                return
            if isinstance(item, Reset):
                restarted = restarted or bool(sent)
            elif not restarted:
                sent.append(item.text)
                yield completion.chunk(Delta(content=item.text))
    except RagError as exc:
        yield json.dumps(error_body(exc), separators=(",", ":"))
        yield DONE
    except Exception:  # the status line is sent: the failure goes in the stream
        log.exception("unhandled_error", path="/v1/chat/completions", request_id=pending.request_id)
        detail = f"the service failed on this request (request id {pending.request_id}); it has been logged"
        yield json.dumps(
            {"error": {"message": detail, "type": "server_error", "param": None, "code": "internal_error"}}
        )
        yield DONE
