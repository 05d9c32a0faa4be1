"""The shared micro-batcher: batching, bounds, per-item failures, callers that give up, stopping.

Batches are formed deterministically: a gate holds the first batch in
``process`` while the next items queue, so no test depends on timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from services.common.batcher import BatcherFull, BatcherStopped, MicroBatcher


class Model:
    """Doubles each number; holds each batch until ``gate`` opens; fails items listed in ``fail``."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: set[int] = set()

    async def process(self, items: list[int]) -> Sequence[int | BaseException]:
        self.batches.append(list(items))
        await self.gate.wait()
        return [ValueError(f"bad {i}") if i in self.fail else i * 2 for i in items]


async def until(condition: Callable[[], bool]) -> None:
    """Lets the loop run until ``condition`` holds (a state to reach, not a time to wait)."""
    async with asyncio.timeout(10):
        while True:
            if condition():
                return
            await asyncio.sleep(0.001)


async def held_first(model: Model, batcher: MicroBatcher[int, int]) -> asyncio.Task[int]:
    """Submits 0 and holds it in ``process``: what is submitted next waits for the following batch."""
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(0))
    await until(lambda: batcher.processing == 1)
    return first


async def test_waiting_items_go_together_in_order_and_answer_their_own_callers() -> None:
    model = Model()
    batcher = MicroBatcher(model.process, max_batch=8, max_wait_ms=0)
    batcher.start()
    try:
        first = await held_first(model, batcher)
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 6)]
        await until(lambda: batcher.pending == 5)
        model.gate.set()
        assert await first == 0
        assert [await task for task in rest] == [2, 4, 6, 8, 10]
    finally:
        await batcher.stop()
    assert model.batches == [[0], [1, 2, 3, 4, 5]]


async def test_batches_hold_at_most_max_batch_of_weight() -> None:
    model = Model()
    batcher = MicroBatcher(model.process, max_batch=4, max_wait_ms=0, weight=lambda n: n)
    batcher.start()
    try:
        first = await held_first(model, batcher)
        sizes = [1, 2, 2, 3, 9, 1]  # 9 is heavier than a batch: it goes alone
        tasks = [asyncio.create_task(batcher.submit(n)) for n in sizes]
        await until(lambda: batcher.pending == sum(sizes))
        model.gate.set()
        await first
        await asyncio.gather(*tasks)
    finally:
        await batcher.stop()
    assert model.batches[1:] == [[1, 2], [2], [3], [9], [1]]


async def test_a_failing_item_fails_alone() -> None:
    model = Model()
    model.fail = {3}
    batcher = MicroBatcher(model.process, max_batch=8, max_wait_ms=0)
    batcher.start()
    try:
        first = await held_first(model, batcher)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in (2, 3, 4)]
        await until(lambda: batcher.pending == 3)
        model.gate.set()
        await first
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await batcher.stop()
    assert results[0] == 4 and results[2] == 8
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad 3"


async def test_process_raising_fails_the_whole_batch_and_the_next_batch_runs() -> None:
    calls = 0

    async def flaky(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("model broke")
        return items

    batcher = MicroBatcher(flaky, max_batch=8, max_wait_ms=0)
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="model broke"):
            await batcher.submit(1)
        assert await batcher.submit(2) == 2
    finally:
        await batcher.stop()


async def test_max_pending_refuses_at_once_beyond_the_bound() -> None:
    model = Model()
    batcher = MicroBatcher(model.process, max_batch=8, max_wait_ms=0, weight=lambda n: n, max_pending=5)
    batcher.start()
    try:
        first = await held_first(model, batcher)
        waiting = asyncio.create_task(batcher.submit(4))
        await until(lambda: batcher.pending == 4)
        with pytest.raises(BatcherFull) as refused:
            await batcher.submit(2)
        assert (refused.value.pending, refused.value.limit) == (6, 5)
        fits = asyncio.create_task(batcher.submit(1))  # 4 + 1 is within the bound
        await until(lambda: batcher.pending == 5)
        model.gate.set()
        assert (await first, await waiting, await fits) == (0, 8, 2)
    finally:
        await batcher.stop()


async def test_a_caller_that_gives_up_is_not_processed() -> None:
    model = Model()
    batcher = MicroBatcher(model.process, max_batch=8, max_wait_ms=0)
    batcher.start()
    try:
        first = await held_first(model, batcher)
        gone = asyncio.create_task(batcher.submit(7))
        kept = asyncio.create_task(batcher.submit(8))
        await until(lambda: batcher.pending == 2)
        gone.cancel()
        model.gate.set()
        await first
        assert await kept == 16
    finally:
        await batcher.stop()
    assert model.batches == [[0], [8]]


async def test_the_wait_adapts_to_the_size_of_the_batch_before() -> None:
    """After a batch of three, a lone item waits (up to max_wait) for two more; they come, and all go at once."""
    model = Model()
    batcher = MicroBatcher(model.process, max_batch=8, max_wait_ms=60_000)
    batcher.start()
    try:
        first = await held_first(model, batcher)
        trio = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
        await until(lambda: batcher.pending == 3)
        model.gate.set()
        await first
        await asyncio.gather(*trio)
        lone = asyncio.create_task(batcher.submit(4))
        await until(lambda: batcher.pending == 0 and len(model.batches) == 2)  # taken, waiting for company
        more = [asyncio.create_task(batcher.submit(i)) for i in (5, 6)]
        assert await asyncio.gather(lone, *more) == [8, 10, 12]
    finally:
        await batcher.stop()
    assert model.batches == [[0], [1, 2, 3], [4, 5, 6]]


async def test_stop_fails_what_is_still_waiting() -> None:
    model = Model()
    batcher = MicroBatcher(model.process, max_batch=1, max_wait_ms=0)
    batcher.start()
    first = await held_first(model, batcher)
    queued = asyncio.create_task(batcher.submit(5))
    await until(lambda: batcher.pending == 1)
    await batcher.stop()
    for task in (first, queued):
        with pytest.raises(BatcherStopped):
            await task
    with pytest.raises(BatcherStopped):
        await batcher.submit(6)


async def test_the_wait_counts_callers_not_weight() -> None:
    """One heavy item (many texts in one request) is one caller: the light item after it goes at once instead
    of waiting (here a minute) for company that is not coming."""
    model = Model()
    batcher = MicroBatcher(model.process, max_batch=8, max_wait_ms=60_000, weight=lambda n: n)
    batcher.start()
    try:
        assert await batcher.submit(6) == 12
        async with asyncio.timeout(10):
            assert await batcher.submit(1) == 2
    finally:
        await batcher.stop()
    assert model.batches == [[6], [1]]


async def test_two_workers_process_two_batches_at_once_each_an_equal_share() -> None:
    model = Model()
    batcher = MicroBatcher(model.process, max_batch=64, max_wait_ms=0, workers=2)
    batcher.start()
    try:
        first = await held_first(model, batcher)  # one worker holds [0]
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 8)]
        # The other worker takes its share of the eight in the batcher (half of them) at once, without waiting
        # for the first batch to finish; the rest wait for a free worker.
        await until(lambda: len(model.batches) == 2)
        assert model.batches[1] == [1, 2, 3, 4]
        assert batcher.processing == 5 and batcher.pending == 3
        model.gate.set()
        assert await first == 0 and [await task for task in rest] == [2 * i for i in range(1, 8)]
    finally:
        await batcher.stop()
    assert sorted(i for batch in model.batches for i in batch) == list(range(8))
    assert all(len(batch) <= 4 for batch in model.batches)


async def test_stopping_fails_the_items_of_every_batch_in_process() -> None:
    model = Model()
    batcher = MicroBatcher(model.process, max_batch=64, max_wait_ms=0, workers=2)
    batcher.start()
    first = await held_first(model, batcher)
    second = asyncio.create_task(batcher.submit(1))
    await until(lambda: len(model.batches) == 2)
    await batcher.stop()
    for task in (first, second):
        with pytest.raises(BatcherStopped):
            await task


def test_workers_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="workers must be at least 1"):
        MicroBatcher(Model().process, max_batch=8, max_wait_ms=0, workers=0)
