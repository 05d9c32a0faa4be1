"""One dynamic micro-batcher for every model: many small concurrent calls become one model call.

Callers ``submit`` an item and await its result. One loop takes what has
arrived and hands it to ``process`` as a list, so the model runs while the
next batch gathers. A batch holds at most ``max_batch`` units of weight
(texts, sequences); one item heavier than that goes alone.

``workers`` batches may be processed at once (one by default). With more than
one, a batch takes at most an equal share of the weight in the batcher
(waiting, being processed, and its own): 32 callers and two workers settle
into two batches of 16 that take turns, one answered and refilled while the
other is processed, instead of one batch of 32 and an idle worker. That is
what a model on CPU cores may want, each worker with its share of the cores;
whether it pays depends on the model and the machine (``bench/embedding.py``
measures it, docs/architecture.md says why).

How long a batch waits to fill adapts to the load: it waits (at most
``max_wait_ms``) only until it holds as many items (callers) as the batch
before it. Under a steady load of N concurrent callers the batches settle at N
with hardly any wait; a lone caller after a busy spell waits at most once, then
goes at once. Items are counted, not their weight: one heavy item (a request
of many texts) does not make the next light one wait for company that is not
coming.

With tracing on, each batch is a span (``span``, with its weight and item count) whose parent is the span of its
first item's caller and which links to every caller's span: a slow request shows the batch it waited in.

``process`` returns one result per item, each a value or the exception that
item failed with; an exception raised by ``process`` itself fails every item
of the batch. ``max_pending`` bounds the weight waiting (not yet in a batch):
beyond it ``submit`` raises ``BatcherFull`` at once, so callers can be told to
come back instead of queueing without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext

from services.common import tracing

log = structlog.get_logger(__name__)
tracer = tracing.tracer(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

Process = Callable[[list[ItemT]], Awaitable[Sequence[ResultT | BaseException]]]
#: Called as each batch starts: its weight, and how long each of its items waited.
OnBatch = Callable[[int, Sequence[float]], None]


class BatcherFull(Exception):
    """More weight is waiting than ``max_pending`` allows."""

    def __init__(self, pending: int, limit: int) -> None:
        super().__init__(f"{pending} waiting, limit {limit}")
        self.pending = pending
        self.limit = limit


class BatcherStopped(Exception):
    """The batcher stopped (the service is shutting down) before the item was processed."""


@dataclass
class _Entry(Generic[ItemT, ResultT]):
    item: ItemT
    weight: int
    future: asyncio.Future[ResultT]
    queued_at: float = field(default_factory=time.perf_counter)
    caller: SpanContext | None = None  # the submitting request's span, when tracing is on


class MicroBatcher(Generic[ItemT, ResultT]):
    def __init__(
        self,
        process: Process[ItemT, ResultT],
        *,
        max_batch: int,
        max_wait_ms: float,
        weight: Callable[[ItemT], int] | None = None,
        max_pending: int = 0,
        on_batch: OnBatch | None = None,
        name: str = "batcher",
        workers: int = 1,
        span: str = "batch",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.process = process
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_pending = max_pending
        self.name = name
        self.workers = workers
        self.span = span
        self._weight = weight or (lambda _: 1)
        self._on_batch = on_batch
        self._waiting: deque[_Entry[ItemT, ResultT]] = deque()
        self._pending = 0
        self._processing = 0
        self._arrived = asyncio.Event()
        self._target = 1  # items in the batch before: how many to wait for
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()  # being processed
        self._stopped = False

    @property
    def pending(self) -> int:
        """Weight waiting for a batch (not counting the batch being processed)."""
        return self._pending

    @property
    def processing(self) -> int:
        """Weight of the batches being processed now (0 when the model is idle)."""
        return self._processing

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for batch in list(self._batches):
            batch.cancel()
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        while self._waiting:
            entry = self._waiting.popleft()
            if not entry.future.done():
                entry.future.set_exception(BatcherStopped(f"{self.name} stopped"))
        self._pending = 0

    async def submit(self, item: ItemT) -> ResultT:
        if self._stopped:
            raise BatcherStopped(f"{self.name} stopped")
        weight = max(1, self._weight(item))
        if self.max_pending and self._pending and self._pending + weight > self.max_pending:
            raise BatcherFull(self._pending + weight, self.max_pending)
        entry: _Entry[ItemT, ResultT] = _Entry(item, weight, asyncio.get_running_loop().create_future())
        if tracing.enabled():
            entry.caller = trace.get_current_span().get_span_context()
        self._waiting.append(entry)
        self._pending += weight
        self._arrived.set()
        return await entry.future

    def _pop(self) -> _Entry[ItemT, ResultT]:
        entry = self._waiting.popleft()
        self._pending -= entry.weight
        return entry

    async def _wait_for_arrival(self, within: float | None) -> bool:
        self._arrived.clear()
        if self._waiting:
            return True
        if within is None:
            await self._arrived.wait()
            return True
        if within <= 0:
            return False
        try:
            await asyncio.wait_for(self._arrived.wait(), within)
        except TimeoutError:
            return False
        return True

    async def _take_batch(self) -> list[_Entry[ItemT, ResultT]]:
        while True:
            await self._wait_for_arrival(None)
            while self._waiting and self._waiting[0].future.done():  # its caller gave up
                self._pop()
            if self._waiting:
                break
        batch = [self._pop()]
        size = batch[0].weight
        deadline = time.monotonic() + self.max_wait
        while size < self._share(size):
            if not self._waiting:
                if len(batch) >= self._target or not await self._wait_for_arrival(deadline - time.monotonic()):
                    break
                continue
            head = self._waiting[0]
            if head.future.done():
                self._pop()
                continue
            if size + head.weight > self._share(size):
                break
            batch.append(self._pop())
            size += head.weight
        self._target = len(batch)
        return batch

    def _share(self, size: int) -> int:
        """The most weight the batch being gathered (``size`` so far) takes: ``max_batch`` with one worker;
        with more, an equal share of the weight waiting, being processed and in this batch."""
        if self.workers == 1:
            return self.max_batch
        total = self._pending + self._processing + size
        return max(1, min(self.max_batch, -(-total // self.workers)))

    async def _run(self) -> None:
        free = asyncio.Semaphore(self.workers)
        while True:
            await free.acquire()
            try:
                batch = await self._take_batch()
            except BaseException:
                free.release()
                raise
            task = asyncio.create_task(self._process(batch), name=f"{self.name}-batch")
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
            task.add_done_callback(lambda _: free.release())

    async def _process(self, batch: list[_Entry[ItemT, ResultT]]) -> None:
        if not tracing.enabled():
            await self._process_batch(batch)
            return
        callers = [entry.caller for entry in batch if entry.caller is not None and entry.caller.is_valid]
        parent = trace.set_span_in_context(trace.NonRecordingSpan(callers[0])) if callers else None
        links = [Link(caller) for caller in callers]
        with tracer.start_as_current_span(self.span, context=parent, links=links) as span:
            span.set_attribute("ragpod.batch.size", sum(entry.weight for entry in batch))
            span.set_attribute("ragpod.batch.items", len(batch))
            await self._process_batch(batch)

    async def _process_batch(self, batch: list[_Entry[ItemT, ResultT]]) -> None:
        started = time.perf_counter()
        weight = sum(e.weight for e in batch)
        self._processing += weight
        try:
            if self._on_batch is not None:
                self._on_batch(weight, [started - e.queued_at for e in batch])
            try:
                results = await self.process([e.item for e in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
            except asyncio.CancelledError:
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(BatcherStopped(f"{self.name} stopped"))
                raise
            except Exception as exc:
                log.warning("batch_failed", batcher=self.name, items=len(batch), error=str(exc)[:300])
                results = [exc] * len(batch)
        finally:
            self._processing -= weight
        for entry, result in zip(batch, results, strict=True):
            if entry.future.done():
                continue
            if isinstance(result, BaseException):
                entry.future.set_exception(result)
            else:
                entry.future.set_result(result)
