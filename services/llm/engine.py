"""The one small interface every generation engine offers the worker.

``local``: the in-process transformers engine (``services.llm.local``).
``openai``: any OpenAI-compatible server (``services.llm.openai_engine``): vLLM's
own server on a GPU, or ``python -m services.llm.server`` on a CPU.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from services.llm.config import Settings

TokenCallback = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 0.0
    repetition_penalty: float = 1.0  # > 1 makes a token already in the prompt or the answer less likely; 1: off
    stop: tuple[str, ...] = ()  # the answer ends before the first of these; they are not part of it


@dataclass(frozen=True)
class Generation:
    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: Literal["stop", "length"]


class EngineError(Exception):
    """A failed generation. ``retryable``: another try may succeed (the server was down, say).

    ``unreachable``: the request never reached the model server (its connection was refused): not a try
    at all. The worker puts the job back uncounted and reads nothing until the engine is ready again.
    """

    def __init__(self, message: str, *, retryable: bool, unreachable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.unreachable = unreachable


class Engine(Protocol):
    model_name: str
    device: str

    async def start(self) -> None: ...

    async def ready(self) -> bool: ...

    async def generate(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> Generation: ...

    async def close(self) -> None: ...


def build_engine(settings: Settings) -> Engine:
    if settings.llm_backend == "openai":
        from services.llm.openai_engine import OpenAIEngine

        return OpenAIEngine(settings)
    from services.llm.local import LocalEngine, LocalOptions

    return LocalEngine(
        LocalOptions(
            model_path=settings.llm_model_path,
            device=settings.llm_device,
            cache_dir=settings.llm_model_cache_dir,
            model_name=settings.llm_model_name,
            max_batch=settings.llm_concurrency,
            batch_wait_ms=settings.llm_batch_wait_ms,
        )
    )
