"""The bridge to an OpenAI-compatible model server, over the official ``openai`` SDK
(``AsyncOpenAI(base_url=...)``): vLLM's own server on a GPU,
``python -m services.llm.server`` on a CPU.

What it relies on (and so what the model server must offer):
- ``POST {base}/chat/completions`` with ``model``, ``messages``, ``max_tokens``,
  ``temperature``, ``stream``, ``stream_options.include_usage``;
- non-streaming answers: ``choices[0].message.content``,
  ``choices[0].finish_reason``, ``usage.prompt_tokens``/``completion_tokens``;
- streaming answers: server-sent ``data:`` lines of ``chat.completion.chunk``
  objects with ``choices[0].delta.content``, a chunk with the
  ``finish_reason``, a last chunk carrying ``usage``, then ``data: [DONE]``;
  a failure after the status line arrives as a ``data: {"error": ...}`` chunk
  (vLLM's way; the SDK raises it), and a stream that ends before a
  ``finish_reason`` is a failure too, never a short answer;
- ``GET {base}/models`` listing the served model (readiness);
- status codes: 400/404/422 for a request that cannot succeed (dead-lettered at
  once), 408/429/5xx and transport errors for one that may (tried again);
- closing the connection aborts the generation (a job past its deadline stops).

The SDK's own retries are off (``max_retries=0``): the queue decides what is
tried again, and where.

With vLLM, the pod's vLLM container is started with (see docs/llm-serving.md):
``--served-model-name`` = ``RAG_LLM_MODEL_NAME``, ``--port 8004`` (the default
``RAG_LLM_OPENAI_URL`` is ``http://127.0.0.1:8004/v1``), ``--max-num-seqs`` at
least ``RAG_LLM_CONCURRENCY``, ``--max-model-len`` above the longest prompt plus
``RAG_LLM_MAX_NEW_TOKENS``, ``--gpu-memory-utilization`` for its share of the
GPU, and ``--api-key`` only together with ``RAG_LLM_OPENAI_API_KEY``.
The server batches the requests in flight itself (vLLM: continuous batching);
this side keeps at most ``RAG_LLM_CONCURRENCY`` of them open.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import openai
import structlog

from services.common import tracing
from services.llm.config import Settings
from services.llm.engine import EngineError, Generation, GenerationRequest, TokenCallback

log = structlog.get_logger(__name__)

# The SDK answers a body it cannot parse with a bare string or a half-built object: these are what reading
# such an answer raises.
_MALFORMED = (ValueError, KeyError, IndexError, TypeError, AttributeError)
# How long a readiness check waits for the server's model list (the pod's readiness probe waits longer).
READY_TIMEOUT_SECONDS = 5.0


class OpenAIEngine:
    def __init__(self, settings: Settings, transport: httpx2.AsyncBaseTransport | None = None) -> None:
        self.model_name = settings.llm_model_name
        self.device = "remote"
        # One connection more than the generations in flight: readiness checks never wait behind them.
        connections = settings.llm_concurrency + 1
        http_client = openai.DefaultAsyncHttpxClient(
            limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=connections),
            transport=transport,
        )
        # The SDK speaks over httpx2, which the httpx hooks do not reach: its own client gets the httpx2 ones, so
        # each call to the model server is a client span and carries the traceparent on (vLLM joins the trace).
        tracing.instrument_httpx2_client(http_client)
        self._client = openai.AsyncOpenAI(
            base_url=settings.llm_openai_url,
            api_key=settings.llm_openai_api_key or "unused",
            max_retries=0,
            timeout=httpx2.Timeout(settings.llm_request_timeout_seconds, connect=5.0),
            http_client=http_client,
        )
        self._slots = asyncio.Semaphore(settings.llm_concurrency)

    async def start(self) -> None:
        """The server may still be loading its model: readiness reports it, and the worker reads no job
        until it is ready (``Worker``)."""

    async def ready(self) -> bool:
        try:
            page = await self._client.models.list(timeout=READY_TIMEOUT_SECONDS)
            served = [model.id for model in page.data]
        except (openai.OpenAIError, *_MALFORMED):
            return False
        return self.model_name in served

    async def close(self) -> None:
        await self._client.close()

    async def generate(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> Generation:
        async with self._slots:
            try:
                if on_token is None:
                    return await self._complete(request)
                return await self._stream(request, on_token)
            except openai.APIStatusError as exc:
                # 408/429/5xx: the server is busy, starting or broken: another try may work. Other 4xx will not.
                status = exc.status_code
                retryable = status in (408, 429) or status >= 500
                raise EngineError(f"model server answered {status}: {exc.message}"[:300], retryable=retryable) from exc
            except openai.APITimeoutError as exc:
                raise EngineError("model server timed out", retryable=True) from exc
            except openai.APIConnectionError as exc:
                cause = exc.__cause__ or exc
                # No connection at all (refused, no route): nothing was sent, so nothing was tried.
                refused = isinstance(cause, httpx2.ConnectError)
                raise EngineError(
                    f"model server unreachable: {type(cause).__name__}", retryable=True, unreachable=refused
                ) from exc
            except openai.APIError as exc:  # an error chunk inside a stream that had started well
                raise EngineError(f"model server failed while streaming: {exc.message}"[:300], retryable=True) from exc
            except _MALFORMED as exc:
                raise EngineError(f"model server sent a malformed answer: {exc!r}"[:300], retryable=True) from exc

    def _arguments(self, request: GenerationRequest) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            **({"stop": list(request.stop)} if request.stop else {}),
            # Not OpenAI's: vLLM (and the CPU model server) take it as an extra sampling parameter.
            **(
                {"extra_body": {"repetition_penalty": request.repetition_penalty}}
                if request.repetition_penalty != 1.0
                else {}
            ),
        }

    async def _complete(self, request: GenerationRequest) -> Generation:
        completion = await self._client.chat.completions.create(**self._arguments(request), stream=False)
        choice = completion.choices[0]
        usage = completion.usage
        return Generation(
            text=(choice.message.content or "").strip(),
            completion_tokens=usage.completion_tokens if usage else 0,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            finish_reason="length" if choice.finish_reason == "length" else "stop",
        )

    async def _stream(self, request: GenerationRequest, on_token: TokenCallback) -> Generation:
        parts: list[str] = []
        completion_tokens = prompt_tokens = 0
        finish: str | None = None
        stream = await self._client.chat.completions.create(
            **self._arguments(request), stream=True, stream_options={"include_usage": True}
        )
        async with stream:  # leaving early (deadline, cancel) closes the connection: the server stops generating
            async for chunk in stream:
                if chunk.object == "error":  # older vLLM: an error object in place of a chunk
                    message = (chunk.model_extra or {}).get("message", "unknown error")
                    raise EngineError(f"model server failed while streaming: {message}"[:300], retryable=True)
                if chunk.usage is not None:
                    completion_tokens, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
                for choice in chunk.choices:
                    if choice.delta.content:
                        parts.append(choice.delta.content)
                        await on_token(choice.delta.content)
                    if choice.finish_reason:
                        finish = choice.finish_reason
        if finish is None:
            raise EngineError("model server closed the stream before [DONE] (no finish_reason)", retryable=True)
        return Generation(
            text="".join(parts).strip(),
            completion_tokens=completion_tokens or len(parts),
            prompt_tokens=prompt_tokens,
            finish_reason="length" if finish == "length" else "stop",
        )
