"""The queue protocol: one stream of jobs, one consumer group of workers, one event stream per job.

One stream of jobs (``RAG_LLM_STREAM``) read by one consumer group of workers
(``RAG_LLM_GROUP``). Each job's answer comes back on a small stream of its own,
``<stream>:events:<job id>``: ``token`` events while streaming, then exactly one
``done`` or ``error``. Events carry the attempt that produced them, so a caller
can tell a retried generation from the first one. A ``<stream>:answered:<job
id>`` key written with NX, in the same script that publishes ``done``, makes
sure only the first finished attempt answers.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from services.common.queue.models import Event, EventType, Job
from services.common.settings import QueueSettings

# redis-py's replies as this module reads them (decode_responses=True).
StreamEntries = list[tuple[str, dict[str, str]]]
StreamReply = list[tuple[str, StreamEntries]] | None


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to a worker: its message id and its raw fields."""

    message_id: str
    fields: dict[str, str]


_ANSWER = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return 0
end
redis.call('XADD', KEYS[2], '*', 'type', 'done', 'attempt', ARGV[1], 'data', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""


class JobQueue:
    def __init__(self, redis: Redis, settings: QueueSettings) -> None:
        self.redis = redis
        self._answer = redis.register_script(_ANSWER)
        self.stream = settings.llm_stream
        self.group = settings.llm_group
        self.dead_letter_stream = settings.llm_dead_letter_stream
        self.ttl = settings.llm_result_ttl_seconds

    # --- keys ---------------------------------------------------------------------------------------------

    def events_key(self, job_id: str) -> str:
        return f"{self.stream}:events:{job_id}"

    def answered_key(self, job_id: str) -> str:
        return f"{self.stream}:answered:{job_id}"

    def tries_key(self) -> str:
        return f"{self.stream}:tries"

    def errors_key(self) -> str:
        return f"{self.stream}:errors"

    # --- both sides ---------------------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def depth(self) -> int:
        """Jobs not yet acknowledged: the group's lag (never delivered) plus its pending entries."""
        try:
            groups = await self.redis.xinfo_groups(self.stream)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return 0
            raise
        for group in groups:
            if group["name"] != self.group:
                continue
            lag = group.get("lag")
            if lag is None:  # lag is unknown after some deletions: count what is left by hand
                rest = cast(StreamEntries, await self.redis.xrange(self.stream, f"({group['last-delivered-id']}", "+"))
                lag = len(rest)
            return int(lag) + int(group["pending"])
        return int(await self.redis.xlen(self.stream))

    # --- the gateway's side -------------------------------------------------------------------------------

    async def enqueue(self, job: Job) -> str:
        message_id = await self.redis.xadd(self.stream, job.encode())  # type: ignore[arg-type]
        return str(message_id)

    async def events(self, job_id: str, *, block_ms: int = 1000) -> AsyncIterator[Event]:
        """Follow a job's events from the first one, forever; the caller stops at done/error/deadline."""
        key = self.events_key(job_id)
        last = "0-0"
        while True:
            reply = cast(StreamReply, await self.redis.xread({key: last}, block=block_ms, count=256))
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    yield Event.decode(fields)

    async def discard(self, job_id: str) -> None:
        await self.redis.delete(self.events_key(job_id))

    # --- the worker's side: reading -----------------------------------------------------------------------

    async def read(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """New jobs for ``consumer``, at most ``count``, waiting up to ``block_ms`` for the first."""
        reply = cast(
            StreamReply,
            await self.redis.xreadgroup(self.group, consumer, {self.stream: ">"}, count=count, block=block_ms),
        )
        return [Delivery(message_id, fields) for _, entries in reply or [] for message_id, fields in entries]

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        """Jobs idle for ``min_idle_ms`` (their worker stopped answering), now ``consumer``'s."""
        _, claimed, _ = await self.redis.xautoclaim(self.stream, self.group, consumer, min_idle_ms, "0-0", count=count)
        return [Delivery(message_id, fields) for message_id, fields in claimed if fields]

    async def keep(self, consumer: str, message_ids: list[str]) -> None:
        """Resets the idle time of jobs still in flight, so live work is never taken away."""
        if message_ids:
            await self.redis.xclaim(self.stream, self.group, consumer, 0, list[Any](message_ids), justid=True)

    async def leave(self, consumer: str) -> None:
        """A consumer with nothing pending leaves the group."""
        pending = await self.redis.xpending_range(
            self.stream, self.group, min="-", max="+", count=1, consumername=consumer
        )
        if not pending:
            await self.redis.xgroup_delconsumer(self.stream, self.group, consumer)

    # --- the worker's side: one job -----------------------------------------------------------------------

    async def count_try(self, job_id: str) -> tuple[int, str]:
        """This start of the job counted: the number of tries so far, and the last try's error."""
        tries = int(await self.redis.hincrby(self.tries_key(), job_id, 1))
        last = await self.redis.hget(self.errors_key(), job_id) if tries > 1 else None
        return tries, str(last or "")

    async def ack(self, delivery: Delivery, job_id: str | None) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, delivery.message_id)
            pipe.xdel(self.stream, delivery.message_id)
            if job_id:
                pipe.hdel(self.tries_key(), job_id)
            await pipe.execute()

    async def hand_back(self, deliveries: list[Delivery]) -> None:
        """Jobs read but not started: back at the end of the stream for the other workers, now."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for delivery in deliveries:
                pipe.xadd(self.stream, delivery.fields)  # type: ignore[arg-type]
                pipe.xack(self.stream, self.group, delivery.message_id)
                pipe.xdel(self.stream, delivery.message_id)
            await pipe.execute()

    async def retry_later(self, delivery: Delivery, job_id: str, error: str) -> None:
        """A failed try that may succeed: a copy at the end of the stream, the error kept for the last try."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.stream, delivery.fields)  # type: ignore[arg-type]
            pipe.hset(self.errors_key(), job_id, error)
            pipe.expire(self.errors_key(), self.ttl)
            pipe.xack(self.stream, self.group, delivery.message_id)
            pipe.xdel(self.stream, delivery.message_id)
            await pipe.execute()

    async def dead_letter(self, delivery: Delivery, job_id: str | None, error: str, tries: int, consumer: str) -> None:
        """To the dead-letter stream with its error; its caller, when known, gets an ``error`` event."""
        entry = {**delivery.fields, "error": error, "tries": str(tries), "failed_at": str(time.time())}
        entry["consumer"] = consumer
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_letter_stream, entry)  # type: ignore[arg-type]
            pipe.xack(self.stream, self.group, delivery.message_id)
            pipe.xdel(self.stream, delivery.message_id)
            if job_id:
                pipe.hdel(self.tries_key(), job_id)
            await pipe.execute()
        if job_id:
            await self.publish(job_id, "error", tries, {"error": "generation_failed", "detail": error})

    async def publish(self, job_id: str, event_type: EventType, attempt: int, data: dict[str, Any]) -> None:
        key = self.events_key(job_id)
        event = Event(type=event_type, attempt=attempt, data=data)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(key, event.encode())  # type: ignore[arg-type]
            pipe.expire(key, self.ttl)
            await pipe.execute()

    async def answer(self, job_id: str, attempt: int, data: dict[str, Any]) -> bool:
        """Claims the answer (``SET NX``) and publishes ``done`` in one atomic step; False if already answered.

        One script, so a worker that dies between the two cannot leave a job
        claimed but unanswered, and the answer costs one round trip. Run twice
        (a retried call whose reply was lost), the second run finds the claim
        and publishes nothing: ``done`` is written once.
        """
        payload = json.dumps(data, separators=(",", ":"))
        keys = [self.answered_key(job_id), self.events_key(job_id)]
        return bool(await self._answer(keys=keys, args=[str(attempt), self.ttl, payload]))
