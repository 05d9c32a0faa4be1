"""The LLM worker: reads jobs from the consumer group, has them generated, answers, acknowledges.

Shaped like arq's and rq's worker loops: each turn checks the stop flag, looks
for jobs of workers that stopped answering (every third of the visibility
timeout or every second, following the pending list across calls), takes at
most as many jobs as it has free slots, with a blocking read, and runs each as
a task. Claimed jobs beyond its free slots go back to the end of the stream for
any free worker; jobs read after a stop was asked for go back at once. In-flight
jobs are re-claimed by this worker every third of the visibility timeout, so
only a worker that has really stopped loses its jobs to the others. A heartbeat, at
start and then every third of the visibility timeout (at most every 5 s), keeps
the worker in the queue's live workers, which the gateway's ``/v1/status``
counts; a stop takes it out at once (before it drains: it takes no new job), a dead worker ages out.

Every Redis command is the queue module's (``services.common.queue``): this
loop only reads, runs and reports. A report that meets a Redis error (a
failover, a blip) is tried again with backoff until the job's deadline, so
finished work is not thrown away. A job whose deadline has passed (on Redis'
clock) is dropped without being generated; a job that has already ended is
not generated again, and one that ends while generating stops at its next token.
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
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.queue import HEARTBEAT_SECONDS, Delivery, Job, JobQueue
from services.llm.config import Settings
from services.llm.engine import Engine, EngineError, GenerationRequest
from services.llm.metrics import (
    DEAD_LETTERS_TRIMMED,
    GENERATION_SECONDS,
    JOBS_ANSWERED,
    JOBS_DEAD_LETTERED,
    JOBS_DROPPED_DEADLINE,
    JOBS_IN_FLIGHT,
    JOBS_RECLAIMED,
    JOBS_RETRIED,
    QUEUE_DEPTH,
    QUEUE_WAIT,
    TOKENS_GENERATED,
)

T = TypeVar("T")

log = structlog.get_logger(__name__)


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
        self._group_ready = False

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
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            with contextlib.suppress(RedisError):
                await self.queue.retire(self.name)
            await self._drain()
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
        block_ms = self.settings.llm_read_block_ms
        free = self.settings.llm_concurrency - len(self._inflight)
        now = time.monotonic()
        if now >= self._next_reclaim:
            claimed, went_round = await self.queue.reclaim(self.name, self.visibility_ms)
            claimed = [d for d in claimed if d.message_id not in self._inflight]  # ours, slow: still running
            JOBS_RECLAIMED.inc(len(claimed))
            await self._start(claimed[: max(free, 0)])
            if claimed[max(free, 0) :]:  # no slot here: back at the end of the stream for a free worker
                await self.queue.hand_back(claimed[max(free, 0) :])
                log.info("jobs_handed_back", count=len(claimed) - max(free, 0), reason="no_free_slot")
            # A scan that has not gone round the pending list yet goes on at the next turn.
            self._next_reclaim = now + (0.0 if not went_round else self.reclaim_interval)
            free = self.settings.llm_concurrency - len(self._inflight)
        if free <= 0:
            await asyncio.wait(list(self._inflight.values()), timeout=block_ms / 1000, return_when=FIRST_COMPLETED)
            return
        await self._start(await self.queue.read(self.name, count=free, block_ms=block_ms))

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
        while True:
            await asyncio.sleep(interval)
            try:
                await self.queue.keep(self.name, list(self._inflight))
            except RedisError as exc:
                log.warning("keep_claims_failed", error=str(exc))

    async def _heartbeat(self) -> None:
        """Says this worker is alive: at once, then every ``heartbeat_interval``."""
        while True:
            try:
                await self.queue.heartbeat(self.name, self.heartbeat_interval)
            except RedisError as exc:
                log.warning("heartbeat_failed", error=str(exc)[:200])
            await asyncio.sleep(self.heartbeat_interval)

    async def _watch_depth(self) -> None:
        while True:
            with contextlib.suppress(RedisError):
                QUEUE_DEPTH.set(await self.queue.depth())
            await asyncio.sleep(2.0)

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
        with structlog.contextvars.bound_contextvars(request_id=job.request_id, job_id=job.id):
            try:
                await self._process(delivery, job)
            except RedisError as exc:
                # Not acknowledged: the job stays pending and is claimed again after the visibility timeout.
                log.warning("job_redis_error", error=str(exc)[:200])

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
        start = await self._persist(
            lambda: self.queue.begin(delivery, job, token, max_tries), time.monotonic() + max(job.timeout_s, 1.0)
        )
        if start.status == "answered":
            log.info("job_already_ended")
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
        sequence = 0

        async def on_token(text: str) -> None:
            nonlocal sequence
            sequence += 1
            seq = sequence
            if not await self._persist(lambda: self.queue.publish_token(job.id, tries, seq, text), until):
                raise _JobEnded

        started = time.monotonic()
        deadline = asyncio.timeout(max(start.remaining_s, 0.001))
        try:
            async with deadline:
                generation = await self.engine.generate(request, on_token if job.stream else None)
        except _JobEnded:
            log.info("job_ended_elsewhere", tokens=sequence)
            return
        except RedisError:
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                JOBS_DROPPED_DEADLINE.inc()
                log.info("job_deadline_during_generation")
                await self.queue.drop(delivery, job.id)
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


class _JobEnded(Exception):
    """Raised from a token callback: another attempt has ended the job; stop generating it."""
