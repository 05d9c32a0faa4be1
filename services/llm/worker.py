"""The LLM worker: reads jobs from the consumer group, has them generated, answers, acknowledges.

Shaped like arq's and rq's worker loops: each turn checks the stop flag, takes
at most as many jobs as it has free slots (stale jobs of dead workers first,
looked for every third of the visibility timeout or every second, then new
ones, with a blocking read), and runs each as a task. Jobs read after a stop
was asked for are put back on the queue at once, not left pending. In-flight jobs
are re-claimed by this worker every third of the visibility timeout, so only a
worker that has really stopped loses its jobs to the others.

Tries are counted per job in ``<stream>:tries``. A failed try that may succeed
again is put back at the end of the queue; after ``RAG_LLM_MAX_TRIES`` the job
goes to the dead-letter stream and its caller hears about it at once. A job
whose deadline has passed is dropped without being generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
from typing import Any

import structlog
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.queue import Delivery, Job, JobQueue
from services.llm.config import Settings
from services.llm.engine import Engine, EngineError, GenerationRequest
from services.llm.metrics import (
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
            await self._drain()
            for task in side_tasks:
                task.cancel()
            await asyncio.gather(*side_tasks, return_exceptions=True)
            with contextlib.suppress(RedisError):
                await self.queue.leave(self.name)
            log.info("worker_stopped", consumer=self.name)

    async def _turn(self) -> None:
        if not self._group_ready:
            await self.queue.ensure_group()
            self._group_ready = True
        free = self.settings.llm_concurrency - len(self._inflight)
        if free <= 0:
            await asyncio.wait(list(self._inflight.values()), timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            return
        deliveries: list[Delivery] = []
        now = time.monotonic()
        if now >= self._next_reclaim:
            deliveries = await self.queue.reclaim(self.name, self.visibility_ms, count=free)
            JOBS_RECLAIMED.inc(len(deliveries))
            # A full claim may have left more behind: look again on the next turn.
            self._next_reclaim = now if len(deliveries) >= free else now + self.reclaim_interval
        if not deliveries:
            deliveries = await self.queue.read(self.name, count=free, block_ms=1000)
        for index, delivery in enumerate(deliveries):
            if self._stop.is_set():
                await self.queue.hand_back(deliveries[index:])
                log.info("jobs_handed_back", count=len(deliveries) - index)
                break
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

    async def _watch_depth(self) -> None:
        while True:
            with contextlib.suppress(RedisError):
                QUEUE_DEPTH.set(await self.queue.depth())
            await asyncio.sleep(2.0)

    async def _dead_letter(self, delivery: Delivery, job_id: str | None, error: str, tries: int) -> None:
        await self.queue.dead_letter(delivery, job_id, error, tries, self.name)
        JOBS_DEAD_LETTERED.inc()
        log.error("job_dead_lettered", job_id=job_id, error=error, tries=tries)

    async def _handle(self, delivery: Delivery) -> None:
        try:
            job = Job.decode(delivery.fields)
        except (KeyError, ValueError, ValidationError) as exc:
            await self._dead_letter(delivery, None, f"malformed job: {exc}", 1)
            return
        with structlog.contextvars.bound_contextvars(request_id=job.request_id, job_id=job.id):
            try:
                await self._process(delivery, job)
            except RedisError as exc:
                # Not acknowledged: the job stays pending and is claimed again after the visibility timeout.
                log.warning("job_redis_error", error=str(exc))

    async def _process(self, delivery: Delivery, job: Job) -> None:
        tries, last_error = await self.queue.count_try(job.id)
        if tries > self.settings.llm_max_tries:
            error = last_error or f"the job was lost by {tries - 1} workers"
            await self._dead_letter(delivery, job.id, f"gave up after {tries - 1} tries: {error}", tries - 1)
            return
        started = time.time()
        if job.expired(started):
            JOBS_DROPPED_DEADLINE.inc()
            log.info("job_expired", waited_s=round(started - job.enqueued_at, 3))
            await self.queue.ack(delivery, job.id)
            return
        QUEUE_WAIT.observe(max(started - job.enqueued_at, 0.0))
        request = GenerationRequest(
            messages=job.messages,
            max_tokens=job.max_tokens or self.settings.llm_max_new_tokens,
            temperature=self.settings.llm_temperature,
        )

        async def on_token(text: str) -> None:
            await self.queue.publish(job.id, "token", tries, {"text": text})

        deadline = asyncio.timeout(max(job.deadline - time.time(), 0.001))
        try:
            async with deadline:
                generation = await self.engine.generate(request, on_token if job.stream else None)
        except RedisError:
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                JOBS_DROPPED_DEADLINE.inc()
                log.info("job_deadline_during_generation")
                await self.queue.ack(delivery, job.id)
                return
            if isinstance(exc, EngineError):
                error, retryable = str(exc), exc.retryable
            else:  # not an EngineError: a bug or a malformed answer; counted as a try like any failure
                log.exception("engine_unexpected_error")
                error, retryable = f"{type(exc).__name__}: {exc}", True
            if retryable and tries < self.settings.llm_max_tries:
                await self.queue.retry_later(delivery, job.id, error)
                JOBS_RETRIED.inc()
                log.warning("job_retry", job_id=job.id, error=error)
            else:
                await self._dead_letter(delivery, job.id, error, tries)
            return
        generate_s = time.time() - started
        GENERATION_SECONDS.observe(generate_s)
        TOKENS_GENERATED.inc(generation.completion_tokens)
        result: dict[str, Any] = {
            "answer": generation.text,
            "completion_tokens": generation.completion_tokens,
            "prompt_tokens": generation.prompt_tokens,
            "finish_reason": generation.finish_reason,
            "model": self.engine.model_name,
            "queue_ms": max(started - job.enqueued_at, 0.0) * 1000,
            "generate_ms": generate_s * 1000,
            "worker": self.name,
        }
        if await self.queue.answer(job.id, tries, result):
            JOBS_ANSWERED.inc()
            log.info("job_answered", tokens=generation.completion_tokens, generate_ms=round(generate_s * 1000, 1))
        else:
            log.info("job_already_answered")
        await self.queue.ack(delivery, job.id)
