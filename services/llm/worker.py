"""The LLM worker: reads jobs from the consumer group, has them generated, answers, acknowledges.

Shaped like arq's and rq's worker loops: each turn checks the stop flag, looks
for jobs of workers that stopped answering (every third of the visibility
timeout or every second, following the pending list across calls), takes at
most as many jobs as it has free slots, with a blocking read, and runs each as
a task. Claimed jobs (one claim batch at a time) wait in this worker for its
next free slots, ahead of any new read, so a dead worker's jobs keep their
place before the jobs admitted after them instead of going to the end of the
stream; jobs read after a stop was asked for go back at once. In-flight
jobs are re-claimed by this worker every third of the visibility timeout, so
only a worker that has really stopped loses its jobs to the others. A heartbeat, at
start and then every third of the visibility timeout (at most every 5 s), keeps
the worker in the queue's live workers, which the gateway's ``/v1/status``
counts; a stop takes it out at once (before it drains: it takes no new job), a dead worker ages out.

The worker reads no job, new or claimed, while its engine is not ready: a model server still loading
(vLLM takes minutes) or restarting. It asks the engine again with a growing pause (up to
``ENGINE_WAIT_MAX_SECONDS``). A job whose call found the server's port closed is put back at the end of
the stream without counting a try, and the worker waits for its engine again: a restart of the model
server costs no job a try, and none is dead-lettered for it.

Every Redis command is the queue module's (``services.common.queue``): this
loop only reads, runs and reports. A report that meets a Redis error (a
failover, a blip) is tried again with backoff until the job's deadline, so
finished work is not thrown away. A job whose deadline has passed (on Redis'
clock) is dropped without being generated; a job that has already ended is
not generated again, and one that ends while generating stops at its next token. A job whose caller has gone
(the gateway marks it abandoned) is not started, and one being generated is stopped as soon as the notice
arrives (a blocking read of the notices, so within a token step), counted in ``rag_llm_jobs_abandoned_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
import uuid
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

import structlog
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common import tracing
from services.common.queue import HEARTBEAT_SECONDS, Delivery, Job, JobQueue
from services.llm.config import Settings
from services.llm.engine import Engine, EngineError, Generation, GenerationRequest
from services.llm.metrics import (
    DEAD_LETTERS_TRIMMED,
    ENGINE_READY,
    GENERATION_SECONDS,
    JOBS_ABANDONED,
    JOBS_ANSWERED,
    JOBS_DEAD_LETTERED,
    JOBS_DROPPED_DEADLINE,
    JOBS_IN_FLIGHT,
    JOBS_RECLAIMED,
    JOBS_RETRIED,
    JOBS_UNTRIED,
    QUEUE_DEPTH,
    QUEUE_WAIT,
    TOKENS_GENERATED,
)

T = TypeVar("T")

ENGINE_WAIT_FIRST_SECONDS = 0.25  # the first pause before the engine is asked again; it doubles from there
ENGINE_WAIT_MAX_SECONDS = 5.0

log = structlog.get_logger(__name__)
tracer = tracing.tracer(__name__)


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    def __init__(self, settings: Settings, engine: Engine, redis: Redis, name: str | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = redis
        self.queue = JobQueue(redis, settings)
        self.name = name or consumer_name()
        self.visibility_ms = int(settings.llm_visibility_timeout_seconds * 1000)
        # Stale jobs are looked for this often, not on every read: a claim only becomes possible after a
        # whole visibility timeout anyway, and a job that just arrived should not wait behind an XAUTOCLAIM.
        self.reclaim_interval = min(settings.llm_visibility_timeout_seconds / 3, 1.0)
        self._next_reclaim = 0.0
        self.heartbeat_interval = max(min(settings.llm_visibility_timeout_seconds / 3, HEARTBEAT_SECONDS), 0.1)
        self._stop = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._orphans: list[Delivery] = []  # reclaimed, waiting here for a slot, ahead of any new read
        self._abandoned: dict[str, asyncio.Event] = {}  # job id -> set when its caller has gone
        self._group_ready = False
        self._engine_ready = False
        self._engine_wait = ENGINE_WAIT_FIRST_SECONDS
        # Set when run() stops each loop beside it, which then ends at its next turn as well as being cancelled:
        # a cancellation that lands as a Redis command's own read timeout fires comes out as that command's
        # ordinary return or a RedisError (asyncio.timeout in Python 3.11), and a loop would go round again.
        self._heartbeat_end = False
        self._side_tasks_end = False

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("worker_stopping", in_flight=len(self._inflight))
            self._stop.set()

    async def run(self) -> None:
        """Until asked to stop; then drains in-flight jobs for at most RAG_LLM_DRAIN_SECONDS."""
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        side_tasks = [
            asyncio.create_task(self._keep_claims(), name="keep-claims"),
            asyncio.create_task(self._watch_depth(), name="watch-depth"),
            asyncio.create_task(self._watch_abandoned(), name="watch-abandoned"),
        ]
        log.info("worker_started", consumer=self.name, stream=self.queue.stream, group=self.queue.group)
        try:
            while not self._stop.is_set():
                try:
                    await self._turn()
                except RedisError as exc:
                    self._group_ready = False  # Redis may have come back empty: create the group again
                    log.warning("worker_redis_error", error=str(exc))
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), 1.0)
        finally:
            # A draining worker takes no new job: out of the live workers at once, not after the drain.
            self._heartbeat_end = True
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            with contextlib.suppress(RedisError):
                await self.queue.retire(self.name)
            if self._orphans:  # reclaimed and not started: for the other workers now
                with contextlib.suppress(RedisError):
                    await self.queue.hand_back(self._orphans)
                self._orphans = []
            await self._drain()
            self._side_tasks_end = True
            for task in side_tasks:
                task.cancel()
            await asyncio.gather(*side_tasks, return_exceptions=True)
            # Out of the group once the drained jobs are acknowledged and keep-claims no longer names it.
            with contextlib.suppress(RedisError):
                await self.queue.leave(self.name)
            log.info("worker_stopped", consumer=self.name)

    async def _turn(self) -> None:
        if not self._group_ready:
            await self.queue.ensure_group()
            self._group_ready = True
        if not await self._wait_for_engine():
            return
        block_ms = self.settings.llm_read_block_ms
        free = self.settings.llm_concurrency - len(self._inflight)
        now = time.monotonic()
        if now >= self._next_reclaim and not self._orphans:
            claimed, went_round = await self.queue.reclaim(self.name, self.visibility_ms)
            waiting = {d.message_id for d in self._orphans}
            # Ours still running (slow, not lost) or already waiting here: nothing to do.
            claimed = [d for d in claimed if d.message_id not in self._inflight and d.message_id not in waiting]
            JOBS_RECLAIMED.inc(len(claimed))
            # Orphans keep their place: they wait here for a slot, ahead of new reads, rather than going to
            # the end of the stream behind everything admitted after them. One claim batch at a time: the
            # next scan waits until these have started.
            self._orphans = claimed
            # A scan that has not gone round the pending list yet goes on at the next turn.
            self._next_reclaim = now + (0.0 if not went_round else self.reclaim_interval)
        free = self.settings.llm_concurrency - len(self._inflight)  # jobs may have ended meanwhile
        if self._orphans and free > 0:
            starting, self._orphans = self._orphans[:free], self._orphans[free:]
            await self._start(starting)
            free = self.settings.llm_concurrency - len(self._inflight)
        if free <= 0:
            await asyncio.wait(list(self._inflight.values()), timeout=block_ms / 1000, return_when=FIRST_COMPLETED)
            return
        await self._start(await self.queue.read(self.name, count=free, block_ms=block_ms))

    async def _wait_for_engine(self) -> bool:
        """True when the engine is ready; else waits a growing pause (a stop ends it) and returns False."""
        if self._engine_ready:
            return True
        if await self.engine.ready():
            self._engine_ready = True
            self._engine_wait = ENGINE_WAIT_FIRST_SECONDS
            ENGINE_READY.set(1)
            log.info("engine_ready", model=self.engine.model_name)
            return True
        ENGINE_READY.set(0)
        log.info("engine_not_ready", retry_in_s=self._engine_wait)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), self._engine_wait)
        self._engine_wait = min(self._engine_wait * 2, ENGINE_WAIT_MAX_SECONDS)
        return False

    def _engine_lost(self) -> None:
        if self._engine_ready:
            log.warning("engine_lost", model=self.engine.model_name)
        self._engine_ready = False
        ENGINE_READY.set(0)

    async def _start(self, deliveries: list[Delivery]) -> None:
        for index, delivery in enumerate(deliveries):
            if self._stop.is_set():
                await self.queue.hand_back(deliveries[index:])
                log.info("jobs_handed_back", count=len(deliveries) - index, reason="stopping")
                return
            if delivery.message_id in self._inflight:
                continue  # our own job, re-claimed while it was slow: it is still running here
            task = asyncio.create_task(self._handle(delivery), name=f"job-{delivery.message_id}")
            self._inflight[delivery.message_id] = task
            JOBS_IN_FLIGHT.set(len(self._inflight))
            task.add_done_callback(functools.partial(self._forget, delivery.message_id))

    def _forget(self, message_id: str, _task: object = None) -> None:
        self._inflight.pop(message_id, None)
        JOBS_IN_FLIGHT.set(len(self._inflight))

    async def _drain(self) -> None:
        if not self._inflight:
            return
        log.info("worker_draining", in_flight=len(self._inflight), seconds=self.settings.llm_drain_seconds)
        _, unfinished = await asyncio.wait(list(self._inflight.values()), timeout=self.settings.llm_drain_seconds)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        if unfinished:
            log.warning("worker_drain_timeout", abandoned=len(unfinished))

    async def _keep_claims(self) -> None:
        """Resets the idle time of jobs still in flight, so live work is never taken away."""
        interval = max(self.settings.llm_visibility_timeout_seconds / 3, 0.1)
        while not self._side_tasks_end:
            await asyncio.sleep(interval)
            try:
                await self.queue.keep(self.name, [*self._inflight, *(d.message_id for d in self._orphans)])
            except RedisError as exc:
                log.warning("keep_claims_failed", error=str(exc))

    async def _heartbeat(self) -> None:
        """Says this worker is alive: at once, then every ``heartbeat_interval``."""
        while not self._heartbeat_end:
            try:
                await self.queue.heartbeat(self.name, self.heartbeat_interval)
            except RedisError as exc:
                log.warning("heartbeat_failed", error=str(exc)[:200])
            await asyncio.sleep(self.heartbeat_interval)

    async def _watch_depth(self) -> None:
        while not self._side_tasks_end:
            with contextlib.suppress(RedisError):
                QUEUE_DEPTH.set(await self.queue.depth())
            await asyncio.sleep(2.0)

    async def _watch_abandoned(self) -> None:
        """Reads the notices of abandoned jobs as they come and flags those this worker is running."""
        after: str | None = None
        while not self._side_tasks_end:
            try:
                if after is None:
                    after = await self.queue.last_abandon_notice()
                after, job_ids = await self.queue.abandon_notices(after, self.settings.llm_read_block_ms)
            except RedisError as exc:
                log.warning("abandon_notices_failed", error=str(exc)[:200])
                await asyncio.sleep(1.0)
                continue
            for job_id in job_ids:
                if job_id in self._abandoned:
                    self._abandoned[job_id].set()

    async def _persist(self, write: Callable[[], Awaitable[T]], until: float) -> T:
        """Runs a queue write, again with backoff while Redis is unreachable, until ``until`` (monotonic).

        Every write of the queue module can run twice without doing anything twice, so a write whose
        reply was lost is simply sent again.
        """
        delay = 0.05
        while True:
            try:
                return await write()
            except RedisError as exc:
                if time.monotonic() + delay >= until:
                    raise
                log.warning("queue_write_retry", error=str(exc)[:200], retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _handle(self, delivery: Delivery) -> None:
        try:
            job = Job.decode(delivery.fields)
        except (KeyError, ValueError, ValidationError) as exc:
            await self._reject(delivery, f"malformed job: {exc}"[:2000])
            return
        with (
            tracing.joined(job.traceparent, "llm.job", SpanKind.CONSUMER),  # in the question's trace
            structlog.contextvars.bound_contextvars(request_id=job.request_id, job_id=job.id),
        ):
            self._abandoned[job.id] = asyncio.Event()  # before it starts: a notice from then on is seen
            try:
                await self._process(delivery, job)
            except RedisError as exc:
                # Not acknowledged: the job stays pending and is claimed again after the visibility timeout.
                log.warning("job_redis_error", error=str(exc)[:200])
            finally:
                self._abandoned.pop(job.id, None)

    async def _reject(self, delivery: Delivery, error: str) -> None:
        """A job that cannot be decoded: dead-lettered, and its caller told when its id can be read."""
        job_id = delivery.job_id
        until = time.monotonic() + self.settings.llm_visibility_timeout_seconds
        try:
            if job_id:
                token = uuid.uuid4().hex
                finish = await self._persist(
                    lambda: self.queue.fail(delivery, job_id, 1, token, error, self.name), until
                )
            else:
                finish = await self._persist(lambda: self.queue.bury(delivery, error, self.name), until)
        except RedisError as exc:
            log.warning("job_redis_error", error=str(exc)[:200])
            return
        self._count_dead_letter(finish.won, finish.trimmed, job_id, error, 1)

    def _count_dead_letter(self, won: bool, trimmed: int, job_id: str, error: str, tries: int) -> None:
        DEAD_LETTERS_TRIMMED.inc(trimmed)
        if won:
            JOBS_DEAD_LETTERED.inc()
            log.error("job_dead_lettered", job_id=job_id or None, error=error, tries=tries)
        else:
            log.info("job_already_ended", job_id=job_id or None)

    async def _process(self, delivery: Delivery, job: Job) -> None:
        token = uuid.uuid4().hex  # this attempt: a try counts once however often its write is sent
        max_tries = self.settings.llm_max_tries
        with tracer.start_as_current_span("queue.read", kind=SpanKind.CONSUMER) as span:
            start = await self._persist(
                lambda: self.queue.begin(delivery, job, token, max_tries), time.monotonic() + max(job.timeout_s, 1.0)
            )
            span.set_attribute("ragpod.queue.status", start.status)
            span.set_attribute("ragpod.queue.tries", start.tries)
            span.set_attribute("ragpod.queue.waited_ms", round(start.waited_s * 1000, 3))
        if start.status == "answered":
            log.info("job_already_ended")
            return
        if start.status == "abandoned":
            JOBS_ABANDONED.inc()
            log.info("job_abandoned", tokens=0, started=False)
            return
        if start.status == "expired":
            JOBS_DROPPED_DEADLINE.inc()
            log.info("job_expired", waited_s=round(start.waited_s, 3))
            return
        until = time.monotonic() + start.remaining_s
        tries = start.tries
        if start.status == "exhausted":
            error = f"gave up after {tries} tries: {start.last_error or f'the job was lost by {tries} workers'}"
            finish = await self._persist(
                lambda: self.queue.fail(delivery, job.id, tries, token, error, self.name), until
            )
            self._count_dead_letter(finish.won, finish.trimmed, job.id, error, tries)
            return
        QUEUE_WAIT.observe(start.waited_s)
        request = GenerationRequest(
            messages=job.messages,
            max_tokens=job.max_tokens or self.settings.llm_max_new_tokens,
            temperature=self.settings.llm_temperature if job.temperature is None else job.temperature,
            repetition_penalty=self.settings.llm_repetition_penalty,
            stop=tuple(self.settings.llm_stop),
        )

        def publish(first: int, texts: list[str]) -> Awaitable[bool]:
            return self._persist(lambda: self.queue.publish_tokens(job.id, tries, first, texts), until)

        tokens = TokenBatches(publish, self.settings.llm_token_flush_ms / 1000) if job.stream else None

        async def on_token(text: str) -> None:
            assert tokens is not None
            tokens.add(text)

        started = time.monotonic()
        deadline = asyncio.timeout(max(start.remaining_s, 0.001))
        abandoned = self._abandoned.get(job.id) or asyncio.Event()
        try:
            async with deadline:
                with tracer.start_as_current_span("llm.generate") as span:
                    span.set_attribute("ragpod.llm.model", self.engine.model_name)
                    span.set_attribute("ragpod.llm.stream", job.stream)
                    generation = await _unless(
                        abandoned, self.engine.generate(request, on_token if tokens is not None else None)
                    )
                    if tokens is not None:
                        await tokens.close()  # every token out before the answer
                    span.set_attribute("ragpod.llm.completion_tokens", generation.completion_tokens)
        except _JobAbandoned:
            await self._stopped_abandoned(delivery, job.id, tokens.made if tokens is not None else 0, until)
            return
        except _JobEnded:
            made = tokens.made if tokens is not None else 0
            if abandoned.is_set() or await self.queue.was_abandoned(job.id):
                await self._stopped_abandoned(delivery, job.id, made, until)
                return
            log.info("job_ended_elsewhere", tokens=made)
            return
        except RedisError:
            raise
        except Exception as exc:
            if tokens is not None:
                tokens.cancel()
            if isinstance(exc, TimeoutError) and deadline.expired():
                JOBS_DROPPED_DEADLINE.inc()
                log.info("job_deadline_during_generation")
                await self.queue.drop(delivery, job.id)
                return
            if isinstance(exc, EngineError) and exc.unreachable:
                # The server's port is closed (restarting, or not started yet): not a try. Back in the queue
                # uncounted, and no more reads here until the engine answers again.
                self._engine_lost()
                if await self._persist(lambda: self.queue.hand_back_untried(delivery, job, token), until):
                    JOBS_UNTRIED.inc()
                    log.info("job_handed_back", reason="engine_unreachable", error=str(exc))
                return
            if isinstance(exc, EngineError):
                error, retryable = str(exc), exc.retryable
            else:  # not an EngineError: a bug or a malformed answer; counted as a try like any failure
                log.exception("engine_unexpected_error")
                error, retryable = f"{type(exc).__name__}: {exc}", True
            if retryable and tries < max_tries:
                if await self._persist(lambda: self.queue.retry_later(delivery, job, error), until):
                    JOBS_RETRIED.inc()
                    log.warning("job_retry", error=error, tries=tries)
            else:
                finish = await self._persist(
                    lambda: self.queue.fail(delivery, job.id, tries, token, error, self.name), until
                )
                self._count_dead_letter(finish.won, finish.trimmed, job.id, error, tries)
            return
        finally:
            if tokens is not None:
                tokens.cancel()  # done already unless generation ended early
        generate_s = time.monotonic() - started
        GENERATION_SECONDS.observe(generate_s)
        TOKENS_GENERATED.inc(generation.completion_tokens)
        result: dict[str, Any] = {
            "answer": generation.text,
            "completion_tokens": generation.completion_tokens,
            "prompt_tokens": generation.prompt_tokens,
            "finish_reason": generation.finish_reason,
            "model": self.engine.model_name,
            "queue_ms": start.waited_s * 1000,
            "generate_ms": generate_s * 1000,
            "worker": self.name,
        }
        # Past the caller's deadline the answer is still written (a caller may read it within the result
        # TTL), but the write is tried again only for a little while.
        if await self._persist(
            lambda: self.queue.answer(delivery, job.id, tries, token, result), max(until, time.monotonic() + 5.0)
        ):
            JOBS_ANSWERED.inc()
            log.info("job_answered", tokens=generation.completion_tokens, generate_ms=round(generate_s * 1000, 1))
        else:
            log.info("job_already_ended")

    async def _stopped_abandoned(self, delivery: Delivery, job_id: str, tokens: int, until: float) -> None:
        """A job stopped mid-generation because its caller had gone: acknowledged, counted, nothing published."""
        JOBS_ABANDONED.inc()
        TOKENS_GENERATED.inc(tokens)  # those streamed before it stopped
        log.info("job_abandoned", tokens=tokens, started=True)
        await self._persist(lambda: self.queue.drop(delivery, job_id), max(until, time.monotonic() + 5.0))


async def _unless(abandoned: asyncio.Event, generation: Coroutine[Any, Any, Generation]) -> Generation:
    """The generation's result, or ``_JobAbandoned`` as soon as ``abandoned`` is set: the generation is then
    cancelled, which stops the engine's work on it at its next step."""
    work = asyncio.ensure_future(generation)
    notice = asyncio.ensure_future(abandoned.wait())
    try:
        done, _ = await asyncio.wait({work, notice}, return_when=FIRST_COMPLETED)
    except BaseException:  # cancelled from outside (the deadline, a stop): the generation goes with it
        work.cancel()
        notice.cancel()
        raise
    notice.cancel()
    if work in done:
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    raise _JobAbandoned


class _JobAbandoned(Exception):
    """The job's caller has gone: stop generating it."""


class _JobEnded(Exception):
    """Raised from a token callback: another attempt has ended the job; stop generating it."""


class TokenBatches:
    """A streaming job's tokens, published in order in batches, while generation goes on.

    A token waits at most ``flush_s`` for others to join it (at most ``MAX_BATCH``), then the batch goes
    out in one round trip; tokens made meanwhile form the next batch. So a slow Redis costs a fraction of
    a round trip per token, not a whole one. Each token keeps its sequence number, so a batch sent again
    after a lost reply publishes nothing twice. ``add`` raises ``_JobEnded`` once the job has ended
    elsewhere, and the publisher's own error (Redis gone past the deadline) once it has failed."""

    MAX_BATCH = 64

    def __init__(self, publish: Callable[[int, list[str]], Awaitable[bool]], flush_s: float) -> None:
        self._publish = publish
        self._flush_s = flush_s
        self._pending: list[str] = []
        self.published = 0
        self._closing = False
        self._ended = False
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="token-batches")

    def add(self, text: str) -> None:
        self._raise_if_done()
        self._pending.append(text)
        self._wake.set()

    async def close(self) -> None:
        """Returns once every token added is published."""
        self._closing = True
        self._wake.set()
        await self._task
        self._raise_if_done()

    def cancel(self) -> None:
        self._task.cancel()

    @property
    def made(self) -> int:
        """Tokens generated so far: published, or waiting for their batch."""
        return self.published + len(self._pending)

    def _raise_if_done(self) -> None:
        if self._ended:
            raise _JobEnded
        if self._task.done() and not self._task.cancelled() and self._task.exception() is not None:
            raise cast(BaseException, self._task.exception())

    async def _run(self) -> None:
        while self._pending or not self._closing:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._pending) < self.MAX_BATCH and not self._closing and self._flush_s > 0:
                await asyncio.sleep(self._flush_s)
            batch = self._pending[: self.MAX_BATCH]
            del self._pending[: len(batch)]
            first = self.published + 1
            self.published += len(batch)
            if not await self._publish(first, batch):
                self._ended = True
                return
