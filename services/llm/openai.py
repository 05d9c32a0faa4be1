"""The bridge to an OpenAI-compatible model server: vLLM's own server on a GPU,
``python -m services.llm.serve`` on a CPU.

What it relies on (and so what the model server must offer):
- ``POST {base}/chat/completions`` with ``model``, ``messages``, ``max_tokens``,
  ``temperature``, ``stream``, ``stream_options.include_usage``;
- non-streaming answers: ``choices[0].message.content``,
  ``choices[0].finish_reason``, ``usage.prompt_tokens``/``completion_tokens``;
- streaming answers: server-sent ``data:`` lines of ``chat.completion.chunk``
  objects with ``choices[0].delta.content``, a last chunk carrying ``usage``,
  then ``data: [DONE]``; a failure after the status line arrives as a
  ``data: {"error": ...}`` chunk (vLLM's way), and a stream that ends without
  ``[DONE]`` is a failure too, never a short answer;
- ``GET {base}/models`` listing the served model (readiness);
- status codes: 400/404/422 for a request that cannot succeed (dead-lettered at
  once), 408/429/5xx and transport errors for one that may (tried again);
- closing the connection aborts the generation (a job past its deadline stops).

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
import json
from typing import Any

import httpx
import structlog

from services.llm.config import Settings
from services.llm.engine import EngineError, Generation, GenerationRequest, TokenCallback

log = structlog.get_logger(__name__)


class OpenAIEngine:
    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.model_name = settings.llm_model_name
        self.device = "remote"
        headers = {"Authorization": f"Bearer {settings.llm_openai_api_key}"} if settings.llm_openai_api_key else {}
        self._client = httpx.AsyncClient(
            base_url=settings.llm_openai_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(settings.llm_request_timeout_seconds, connect=5.0),
            # One connection more than the generations in flight: readiness checks never wait behind them.
            limits=httpx.Limits(
                max_connections=settings.llm_concurrency + 1, max_keepalive_connections=settings.llm_concurrency + 1
            ),
            transport=transport,
        )
        self._slots = asyncio.Semaphore(settings.llm_concurrency)

    async def start(self) -> None:
        """The server may still be loading its model: readiness reports it, jobs wait for it."""

    async def ready(self) -> bool:
        try:
            response = await self._client.get("models", timeout=5.0)
            if response.status_code != 200:
                return False
            served = [m.get("id") for m in response.json().get("data", [])]
        except (httpx.HTTPError, ValueError, AttributeError):
            return False
        return self.model_name in served

    async def close(self) -> None:
        await self._client.aclose()

    def _body(self, request: GenerationRequest, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def generate(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> Generation:
        async with self._slots:
            try:
                if on_token is None:
                    return await self._complete(request)
                return await self._stream(request, on_token)
            except httpx.TimeoutException as exc:
                raise EngineError("model server timed out", retryable=True) from exc
            except httpx.TransportError as exc:
                raise EngineError(f"model server unreachable: {type(exc).__name__}", retryable=True) from exc
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
                raise EngineError(f"model server sent a malformed answer: {exc!r}"[:300], retryable=True) from exc

    async def _complete(self, request: GenerationRequest) -> Generation:
        response = await self._client.post("chat/completions", json=self._body(request, stream=False))
        _raise_for_status(response.status_code, response.text)
        body = response.json()
        choice = body["choices"][0]
        usage = body.get("usage") or {}
        return Generation(
            text=(choice["message"].get("content") or "").strip(),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
        )

    async def _stream(self, request: GenerationRequest, on_token: TokenCallback) -> Generation:
        parts: list[str] = []
        usage: dict[str, Any] = {}
        finish = "stop"
        chunks = 0
        finished = False
        async with self._client.stream("POST", "chat/completions", json=self._body(request, stream=True)) as response:
            if response.status_code != 200:
                _raise_for_status(response.status_code, (await response.aread()).decode(errors="replace"))
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                chunk = json.loads(data)
                if chunk.get("error") or chunk.get("object") == "error":  # vLLM reports mid-stream failures so
                    error = chunk.get("error") or chunk
                    message = error.get("message", error) if isinstance(error, dict) else error
                    raise EngineError(f"model server failed while streaming: {message}"[:300], retryable=True)
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        chunks += 1
                        parts.append(delta)
                        await on_token(delta)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
        if not finished:
            raise EngineError("model server closed the stream before [DONE]", retryable=True)
        return Generation(
            text="".join(parts).strip(),
            completion_tokens=int(usage.get("completion_tokens", chunks)),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            finish_reason="length" if finish == "length" else "stop",
        )


def _raise_for_status(status: int, text: str) -> None:
    if status == 200:
        return
    detail = text[:300]
    # 408/429/5xx: the server is busy, starting or broken: another try may work. Other 4xx will not.
    retryable = status in (408, 429) or status >= 500
    raise EngineError(f"model server answered {status}: {detail}", retryable=retryable)
