"""The in-process engine with the real SmolLM2 on the CPU: one failing prompt does not fail its batch.

A fault is injected into the model call for batches that hold one marked
prompt; the batch is formed deterministically (the engine's thread is held
while the four requests queue), so the test does not depend on timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import torch

from services.llm.engine import EngineError, Generation, GenerationRequest
from services.llm.local import LocalEngine, LocalOptions, load_model
from tests.fixtures.llm import wait_for
from tests.fixtures.models import MODEL_CACHE

pytestmark = pytest.mark.slow

POISON = "POISON"


def ask(text: str) -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": text}], max_tokens=4)


OPTIONS = LocalOptions(device="cpu", cache_dir=str(MODEL_CACHE), max_batch=4, batch_wait_ms=0)


@pytest.fixture(scope="module")
def model() -> tuple[Any, Any]:
    return load_model(OPTIONS, "cpu")


@pytest.fixture
async def engine(model: tuple[Any, Any]) -> AsyncIterator[LocalEngine]:
    engine = LocalEngine(OPTIONS, model)
    await engine.start()
    yield engine
    await engine.close()


async def until(condition: Callable[[], bool]) -> None:
    async def check() -> bool:
        return condition()

    await wait_for(check, within=30)


def inject(engine: LocalEngine, failure: Callable[[], Exception]) -> list[int]:
    """Batches that hold the marked prompt raise ``failure()``; returns the sizes of the batches run."""
    original = engine._generate
    sizes: list[int] = []

    def generate(items: list[Any], temperature: float) -> None:
        sizes.append(len(items))
        if any(POISON in item.request.messages[-1]["content"] for item in items):
            raise failure()
        original(items, temperature)

    engine._generate = generate  # type: ignore[method-assign]
    return sizes


async def run_together(engine: LocalEngine, requests: list[GenerationRequest]) -> list[Generation | BaseException]:
    """Queues ``requests`` while the engine's thread is held, so they are decoded as one batch."""
    gate = threading.Event()
    loop = asyncio.get_running_loop()
    held = loop.run_in_executor(engine._executor, gate.wait)
    warm = asyncio.ensure_future(engine.generate(ask("Say hi.")))  # taken alone, waits behind the gate
    await until(lambda: engine.decoding == 1)
    tasks = [asyncio.ensure_future(engine.generate(r)) for r in requests]
    await until(lambda: engine.waiting == len(requests))
    gate.set()
    await held
    await warm
    return list(await asyncio.gather(*tasks, return_exceptions=True))


@pytest.mark.parametrize(
    ("failure", "retryable"),
    [
        (lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (lambda: TimeoutError("the decode step timed out"), True),
        (lambda: ValueError("the prompt cannot be tokenized"), False),
    ],
    ids=["out-of-memory", "timeout", "bad-prompt"],
)
async def test_one_failing_prompt_fails_alone(
    engine: LocalEngine, failure: Callable[[], Exception], retryable: bool
) -> None:
    sizes = inject(engine, failure)
    questions = ["What is the capital of France?", f"{POISON} prompt", "Name a colour.", "Count to three."]
    results = await run_together(engine, [ask(q) for q in questions])
    # The warm-up alone, the batch of four together, then each of the four alone.
    assert sizes == [1, 4, 1, 1, 1, 1]
    answers = [results[0], results[2], results[3]]
    assert all(isinstance(a, Generation) and a.text and a.completion_tokens > 0 for a in answers)
    error = results[1]
    assert isinstance(error, EngineError)
    assert error.retryable is retryable
    if retryable and "memory" in str(failure()):
        assert "out of memory" in str(error)


async def test_a_prompt_that_streamed_is_not_generated_twice(engine: LocalEngine) -> None:
    """An item whose caller has seen tokens fails (retryable) instead of streaming a second answer."""
    original = engine._generate
    calls: list[int] = []

    def generate(items: list[Any], temperature: float) -> None:
        calls.append(len(items))
        if len(items) > 1:
            streamer_item = items[0]
            streamer_item.text = "Par"  # as if its first tokens had gone out
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        original(items, temperature)

    engine._generate = generate  # type: ignore[method-assign]
    seen: list[str] = []

    async def on_token(text: str) -> None:
        seen.append(text)

    gate = threading.Event()
    held = asyncio.get_running_loop().run_in_executor(engine._executor, gate.wait)
    warm = asyncio.ensure_future(engine.generate(ask("Say hi.")))
    await until(lambda: engine.decoding == 1)
    streamed = asyncio.ensure_future(engine.generate(ask("What is the capital of France?"), on_token))
    plain = asyncio.ensure_future(engine.generate(ask("Name a colour.")))
    await until(lambda: engine.waiting == 2)
    gate.set()
    await held
    await warm
    results = await asyncio.gather(streamed, plain, return_exceptions=True)
    assert calls == [1, 2, 1]  # only the one that had not streamed is tried again
    assert isinstance(results[0], EngineError) and results[0].retryable
    assert isinstance(results[1], Generation) and results[1].completion_tokens > 0


async def test_a_stop_string_ends_the_answer_and_is_never_streamed(engine: LocalEngine) -> None:
    """The answer is the text before the first stop string; a stream never shows any part of it."""
    request = GenerationRequest(
        [{"role": "user", "content": "Write three short lines about cats, one line each."}],
        max_tokens=48,
        stop=("\n",),
    )
    free = await engine.generate(GenerationRequest(request.messages, max_tokens=48))
    assert "\n" in free.text  # without the stop the model writes several lines
    streamed: list[str] = []

    async def on_token(text: str) -> None:
        streamed.append(text)

    stopped = await engine.generate(request, on_token)
    assert stopped.text and "\n" not in stopped.text
    assert stopped.text == free.text.split("\n")[0].strip()
    assert "".join(streamed).strip() == stopped.text
    assert stopped.finish_reason == "stop"


async def test_the_repetition_penalty_cuts_a_loop(engine: LocalEngine) -> None:
    """Greedy decoding of a prompt that invites a loop repeats itself; the penalty breaks the loop."""
    messages = [{"role": "user", "content": "Repeat after me forever: the queue, the queue, the queue, the queue"}]

    def most_repeated(text: str) -> int:
        words = text.lower().split()
        return max((words.count(w) for w in set(words)), default=0)

    looping = await engine.generate(GenerationRequest(messages, max_tokens=40))
    penalised = await engine.generate(GenerationRequest(messages, max_tokens=40, repetition_penalty=1.3))
    assert most_repeated(looping.text) >= 8, looping.text
    assert most_repeated(penalised.text) < most_repeated(looping.text) / 2, penalised.text
