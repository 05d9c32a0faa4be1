"""The queue protocol: one stream of jobs, one consumer group of workers, one event stream per job.

Keys, all under the stream's name ``S`` (``RAG_LLM_STREAM``):

- ``S``: the jobs, read by the consumer group ``RAG_LLM_GROUP``. An entry holds the job (``job``) and its
  deadline on Redis' clock (``deadline_ms``); acknowledged entries are deleted, so the stream holds only
  jobs not yet finished, and depth = XLEN - pending = jobs admitted and not yet started.
- ``S:events:<job id>``: what the caller reads: ``token`` events while streaming, then exactly one
  ``done`` or ``error``. Expires ``RAG_LLM_RESULT_TTL_SECONDS`` after the last write.
- ``S:answered:<job id>``: the terminal mark, set (NX) in the script that publishes ``done`` or ``error``.
  Checked before a try starts, on each token and before a job is put back or dead-lettered.
- ``S:job:<job id>``: the job's bookkeeping while it lives (its entry, tries, the last try's error, the
  last token sequence number per attempt). It expires with the job's budget and is deleted when it ends.
- ``S:workers``: the live workers, a sorted set of consumer names, each scored by the moment (Redis' clock,
  ms) until which its last heartbeat counts. A worker beats at start and every ``HEARTBEAT_SECONDS`` at
  most, counts as live for three of its beats, and takes itself out when it stops cleanly. (``XINFO
  CONSUMERS`` cannot tell: Redis 7.0 does not refresh an idle consumer's idle time on an empty read.)
- ``RAG_LLM_DEAD_LETTER_STREAM``: failed jobs with their error, capped at ``RAG_LLM_DEAD_LETTER_MAX_LEN``.
- ``S:abandoned``: notices of jobs whose caller has gone (``abandon``), one entry per job, the newest
  ``ABANDON_NOTICES_KEPT`` or so kept. Every worker reads it (not as a group) and stops generating such a job;
  the job's answered mark, set to ``abandoned`` in the same step, stops whatever the notice does not reach.

Every write is one Lua script (``scripts.py``) that can run twice without doing anything twice, because
the client sends a command again when a connection breaks and a reply may be lost after the command ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

from opentelemetry.trace import SpanKind
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common import tracing
from services.common.queue import scripts
from services.common.queue.models import Event, Job
from services.common.settings import QueueSettings

# redis-py's replies as this module reads them (decode_responses=True).
StreamEntries = list[tuple[str, dict[str, str]]]
StreamReply = list[tuple[str, StreamEntries]] | None
StartStatus = Literal["run", "answered", "abandoned", "expired", "exhausted"]
CLAIM_BATCH = 16  # entries claimed per XAUTOCLAIM; Redis looks at up to ten times as many per call
HEARTBEAT_SECONDS = 5.0  # a worker's longest time between heartbeats (less with a short visibility timeout)
HEARTBEATS_LIVE = 3  # a worker counts as live for this many of its heartbeat intervals after each beat
ABANDON_NOTICES_KEPT = 10000

tracer = tracing.tracer(__name__)


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to a worker: its message id and its raw fields."""

    message_id: str
    fields: dict[str, str]

    @property
    def job_id(self) -> str:
        """The job's id when it can be read, even from a job that cannot be decoded; else ''."""
        try:
            value = json.loads(self.fields["job"]).get("id")
        except (KeyError, ValueError, AttributeError):
            return ""
        return value if isinstance(value, str) else ""

    def deadline_ms(self, job: Job) -> int:
        """The job's deadline on Redis' clock: set at admission, else the entry's own time plus the budget."""
        if "deadline_ms" in self.fields:
            return int(self.fields["deadline_ms"])
        return int(self.message_id.split("-")[0]) + int(job.timeout_s * 1000)


@dataclass(frozen=True)
class Admission:
    admitted: bool
    depth: int  # jobs waiting when it was decided (-1: a retried enqueue found its job already in)
    message_id: str = ""


@dataclass(frozen=True)
class Start:
    """What a worker learns when it starts a job (``JobQueue.begin``)."""

    status: StartStatus
    tries: int  # this try's number (for ``exhausted``: the tries made)
    waited_s: float  # since admission, on Redis' clock
    remaining_s: float  # of the caller's budget, on Redis' clock
    last_error: str


@dataclass(frozen=True)
class Finish:
    won: bool  # this call ended the job (False: another attempt had ended it)
    trimmed: int  # dead letters trimmed to keep the stream's cap


class JobQueue:
    def __init__(self, redis: Redis, settings: QueueSettings) -> None:
        self.redis = redis
        self.stream = settings.llm_stream
        self.group = settings.llm_group
        self.dead_letter_stream = settings.llm_dead_letter_stream
        self.dead_letter_max_len = settings.llm_dead_letter_max_len
        self.ttl = settings.llm_result_ttl_seconds
        self._enqueue = redis.register_script(scripts.ENQUEUE)
        self._depth = redis.register_script(scripts.DEPTH)
        self._begin = redis.register_script(scripts.BEGIN)
        self._token = redis.register_script(scripts.TOKEN)
        self._tokens = redis.register_script(scripts.TOKENS)
        self._finish = redis.register_script(scripts.FINISH)
        self._bury = redis.register_script(scripts.BURY)
        self._requeue = redis.register_script(scripts.REQUEUE)
        self._drop = redis.register_script(scripts.DROP)
        self._untried = redis.register_script(scripts.UNTRIED)
        self._heartbeat = redis.register_script(scripts.HEARTBEAT)
        self._live_workers = redis.register_script(scripts.LIVE_WORKERS)
        self._abandon = redis.register_script(scripts.ABANDON)
        self._claim_cursor = "0-0"

    # --- keys ---------------------------------------------------------------------------------------------

    def events_key(self, job_id: str) -> str:
        return f"{self.stream}:events:{job_id}"

    def answered_key(self, job_id: str) -> str:
        return f"{self.stream}:answered:{job_id}"

    def job_key(self, job_id: str) -> str:
        return f"{self.stream}:job:{job_id}"

    def workers_key(self) -> str:
        return f"{self.stream}:workers"

    def abandoned_key(self) -> str:
        return f"{self.stream}:abandoned"

    def _state_ttl(self, remaining_s: float) -> int:
        return max(int(remaining_s), 0) + self.ttl

    # --- both sides ---------------------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def depth(self) -> int:
        """Jobs admitted and not yet started by a worker: entries never delivered to the group."""
        return int(await self._depth(keys=[self.stream], args=[self.group]))

    async def live_workers(self) -> int:
        """Workers whose last heartbeat still counts (Redis' clock), in one round trip; trims the others."""
        return int(await self._live_workers(keys=[self.workers_key()]))

    # --- the gateway's side -------------------------------------------------------------------------------

    async def enqueue(self, job: Job, *, max_depth: int = 0) -> Admission:
        """Adds the job unless ``max_depth`` jobs already wait (0: no bound), in one atomic step.

        With tracing on, the job carries this step's span as its ``traceparent``: the worker's spans join it."""
        with tracer.start_as_current_span("queue.enqueue", kind=SpanKind.PRODUCER) as span:
            parent = tracing.traceparent()
            if parent:
                job = job.model_copy(update={"traceparent": parent})
            keys = [self.stream, self.job_key(job.id)]
            timeout_ms = int(job.timeout_s * 1000)
            args: list[Any] = [self.group, max_depth, job.model_dump_json(), timeout_ms, self._state_ttl(job.timeout_s)]
            admitted, message_id, depth = await self._enqueue(keys=keys, args=args)
            span.set_attribute("ragpod.job.id", job.id)
            span.set_attribute("ragpod.queue.admitted", bool(admitted))
            span.set_attribute("ragpod.queue.depth", int(depth))
        return Admission(bool(admitted), int(depth), str(message_id))

    async def events(
        self, job_id: str, *, block_ms: int = 1000, on_outage: Callable[[RedisError | None], None] | None = None
    ) -> AsyncIterator[Event]:
        """Follow a job's events from the first one, forever; the caller stops at done/error/deadline.

        A read that cannot reach Redis (a restart, a failover, a blip) is tried again with backoff (50 ms,
        doubling, at most 1 s) from the last event read, for as long as the caller follows: the job and its
        events outlive the outage wherever Redis keeps its data, so a blip costs the caller time, not the
        answer. ``on_outage`` hears of each failed read (the error) and of the first read after (None)."""
        key = self.events_key(job_id)
        last = "0-0"
        delay = 0.0
        while True:
            try:
                reply = cast(StreamReply, await self.redis.xread({key: last}, block=block_ms, count=256))
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if on_outage is not None:
                    on_outage(exc)
                delay = min(max(delay * 2, 0.05), 1.0)
                await asyncio.sleep(delay)
                continue
            if delay and on_outage is not None:
                on_outage(None)
            delay = 0.0
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    yield Event.decode(fields)

    async def discard(self, job_id: str) -> None:
        await self.redis.delete(self.events_key(job_id))

    async def abandon(self, job_id: str) -> bool:
        """The caller has gone: the job ends with no answer, and workers generating it stop. False when it had
        ended already."""
        keys = [self.answered_key(job_id), self.abandoned_key()]
        return bool(await self._abandon(keys=keys, args=[self.ttl, job_id, ABANDON_NOTICES_KEPT]))

    # --- the worker's side: abandoned jobs ----------------------------------------------------------------

    async def was_abandoned(self, job_id: str) -> bool:
        return bool(await self.redis.get(self.answered_key(job_id)) == "abandoned")

    async def last_abandon_notice(self) -> str:
        """Where a new reader of the abandon notices starts: after the newest one."""
        newest = await self.redis.xrevrange(self.abandoned_key(), count=1)
        return str(newest[0][0]) if newest else "0-0"

    async def abandon_notices(self, after: str, block_ms: int) -> tuple[str, list[str]]:
        """Jobs abandoned since notice ``after``, waiting up to ``block_ms`` for one; and the newest notice read."""
        reply = cast(StreamReply, await self.redis.xread({self.abandoned_key(): after}, block=block_ms, count=256))
        job_ids: list[str] = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                after = entry_id
                job_ids.append(fields.get("job", ""))
        return after, job_ids

    # --- the worker's side: reading -----------------------------------------------------------------------

    async def read(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """New jobs for ``consumer``, at most ``count``, waiting up to ``block_ms`` for the first.

        A read whose reply is lost leaves its entries pending for ``consumer``: they are claimed again
        after the visibility timeout, by any worker.
        """
        reply = cast(
            StreamReply,
            await self.redis.xreadgroup(self.group, consumer, {self.stream: ">"}, count=count, block=block_ms),
        )
        return [Delivery(message_id, fields) for _, entries in reply or [] for message_id, fields in entries]

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int = CLAIM_BATCH) -> tuple[list[Delivery], bool]:
        """Jobs idle for ``min_idle_ms`` (their worker stopped answering), now ``consumer``'s.

        The scan goes on from where the last call stopped, so every pending entry is looked at in turn
        however many live ones lie in front. Returns the claimed jobs and whether the scan went round
        (True: the whole pending list has been looked at since the cursor was last at its start).
        """
        cursor, claimed, _ = await self.redis.xautoclaim(
            self.stream, self.group, consumer, min_idle_ms, self._claim_cursor, count=count
        )
        self._claim_cursor = str(cursor)
        return [Delivery(message_id, fields) for message_id, fields in claimed if fields], self._claim_cursor == "0-0"

    async def keep(self, consumer: str, message_ids: list[str]) -> None:
        """Resets the idle time of jobs still in flight, so live work is never taken away."""
        if message_ids:
            await self.redis.xclaim(self.stream, self.group, consumer, 0, list[Any](message_ids), justid=True)

    async def heartbeat(self, consumer: str, interval_s: float) -> None:
        """``consumer`` is alive and beats again within ``interval_s``: live for ``HEARTBEATS_LIVE`` of them."""
        live_for_ms = max(int(interval_s * HEARTBEATS_LIVE * 1000), 1)
        await self._heartbeat(keys=[self.workers_key()], args=[consumer, live_for_ms])

    async def retire(self, consumer: str) -> None:
        """A consumer takes no new job (it stops, perhaps draining first): no longer a live worker."""
        await self.redis.zrem(self.workers_key(), consumer)

    async def leave(self, consumer: str) -> None:
        """A consumer stops: no longer a live worker, and out of the group when it has nothing pending."""
        await self.retire(consumer)
        pending = await self.redis.xpending_range(
            self.stream, self.group, min="-", max="+", count=1, consumername=consumer
        )
        if not pending:
            await self.redis.xgroup_delconsumer(self.stream, self.group, consumer)

    # --- the worker's side: one job -----------------------------------------------------------------------

    async def begin(self, delivery: Delivery, job: Job, attempt_token: str, max_tries: int) -> Start:
        """A worker starts a job: counts the try (once per ``attempt_token``) or finds it ended or expired."""
        deadline_ms = delivery.deadline_ms(job)
        keys = [self.stream, self.job_key(job.id), self.answered_key(job.id)]
        ttl = self._state_ttl(job.timeout_s)
        args: list[Any] = [self.group, delivery.message_id, attempt_token, max_tries, deadline_ms, ttl]
        status, tries, now_ms, last_error = await self._begin(keys=keys, args=args)
        admitted_ms = deadline_ms - int(job.timeout_s * 1000)
        return Start(
            status=cast(StartStatus, status),
            tries=int(tries),
            waited_s=max(int(now_ms) - admitted_ms, 0) / 1000,
            remaining_s=(deadline_ms - int(now_ms)) / 1000,
            last_error=str(last_error or ""),
        )

    async def publish_token(self, job_id: str, attempt: int, seq: int, text: str) -> bool:
        """Token ``seq`` (1, 2, ...) of ``attempt``, once; False when the job has ended: stop generating."""
        keys = [self.events_key(job_id), self.job_key(job_id), self.answered_key(job_id)]
        data = json.dumps({"text": text}, separators=(",", ":"))
        return bool(await self._token(keys=keys, args=[attempt, seq, data, self.ttl]))

    async def publish_tokens(self, job_id: str, attempt: int, first_seq: int, texts: list[str]) -> bool:
        """Tokens ``first_seq``, ``first_seq + 1``, ... of ``attempt`` in one round trip, each once; False when
        the job has ended: stop generating."""
        keys = [self.events_key(job_id), self.job_key(job_id), self.answered_key(job_id)]
        data = [json.dumps({"text": text}, separators=(",", ":")) for text in texts]
        return bool(await self._tokens(keys=keys, args=[attempt, first_seq, self.ttl, *data]))

    async def answer(self, delivery: Delivery, job_id: str, attempt: int, token: str, data: dict[str, Any]) -> bool:
        """Publishes ``done`` unless the job has ended already, and acknowledges it; False if it had."""
        with tracer.start_as_current_span("queue.answer", kind=SpanKind.PRODUCER) as span:
            finish = await self._end(delivery, job_id, "done", attempt, token, data, {})
            span.set_attribute("ragpod.queue.won", finish.won)
        return finish.won

    async def fail(
        self, delivery: Delivery, job_id: str, attempt: int, token: str, error: str, consumer: str
    ) -> Finish:
        """Dead-letters the job and tells its caller (``error``), unless the job has ended already."""
        entry = self._dead_entry(delivery, error, attempt, consumer)
        data = {"error": "generation_failed", "detail": error}
        return await self._end(delivery, job_id, "error", attempt, token, data, entry)

    async def bury(self, delivery: Delivery, error: str, consumer: str) -> Finish:
        """Dead-letters an entry with no readable job id: there is nobody to tell."""
        entry = self._dead_entry(delivery, error, 1, consumer)
        args: list[Any] = [self.group, delivery.message_id, self.dead_letter_max_len]
        for name, value in entry.items():
            args += [name, value]
        moved, trimmed = await self._bury(keys=[self.stream, self.dead_letter_stream], args=args)
        return Finish(bool(moved), int(trimmed))

    async def retry_later(self, delivery: Delivery, job: Job, error: str) -> bool:
        """A failed try that may succeed: back at the end of the stream, its error kept for the last try."""
        return await self._requeue_one(delivery, job.id, error, job)

    async def hand_back(self, deliveries: list[Delivery]) -> int:
        """Jobs read but not started: back at the end of the stream for the other workers, now."""
        moved = 0
        for delivery in deliveries:
            moved += await self._requeue_one(delivery, delivery.job_id, "", None)
        return moved

    async def hand_back_untried(self, delivery: Delivery, job: Job, attempt_token: str) -> bool:
        """A try that never reached the model server: back at the end of the stream, not counted as a try."""
        fields = dict(delivery.fields)
        fields.setdefault("deadline_ms", str(delivery.deadline_ms(job)))
        keys = [self.stream, self.job_key(job.id), self.answered_key(job.id)]
        args: list[Any] = [self.group, delivery.message_id, attempt_token]
        for name, value in fields.items():
            args += [name, value]
        return bool(await self._untried(keys=keys, args=args))

    async def drop(self, delivery: Delivery, job_id: str) -> None:
        """The caller has given up: acknowledged, nothing published."""
        await self._drop(keys=[self.stream, self.job_key(job_id)], args=[self.group, delivery.message_id])

    # --- internals ----------------------------------------------------------------------------------------

    async def _end(
        self,
        delivery: Delivery,
        job_id: str,
        kind: Literal["done", "error"],
        attempt: int,
        token: str,
        data: dict[str, Any],
        dead_entry: dict[str, str],
    ) -> Finish:
        keys = [
            self.answered_key(job_id),
            self.events_key(job_id),
            self.job_key(job_id),
            self.stream,
            self.dead_letter_stream,
        ]
        payload = json.dumps(data, separators=(",", ":"))
        args: list[Any] = [self.group, delivery.message_id, kind, attempt, token, payload, self.ttl]
        args.append(self.dead_letter_max_len)
        for name, value in dead_entry.items():
            args += [name, value]
        won, trimmed = await self._finish(keys=keys, args=args)
        return Finish(bool(won), int(trimmed))

    async def _requeue_one(self, delivery: Delivery, job_id: str, error: str, job: Job | None) -> bool:
        fields = dict(delivery.fields)
        if "deadline_ms" not in fields:  # an entry added without one: the new entry's own time is not the start
            if job is None:
                with contextlib.suppress(KeyError, ValueError):
                    job = Job.decode(fields)
            if job is not None:
                fields["deadline_ms"] = str(delivery.deadline_ms(job))
        key_id = job_id or f"entry-{delivery.message_id}"
        keys = [self.stream, self.job_key(key_id), self.answered_key(key_id)]
        args: list[Any] = [self.group, delivery.message_id, error]
        for name, value in fields.items():
            args += [name, value]
        return bool(await self._requeue(keys=keys, args=args))

    def _dead_entry(self, delivery: Delivery, error: str, tries: int, consumer: str) -> dict[str, str]:
        return {
            **delivery.fields,
            "error": error,
            "tries": str(tries),
            "failed_at": str(time.time()),
            "consumer": consumer,
        }
