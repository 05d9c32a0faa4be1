"""The Redis Streams protocol between the gateway and the LLM workers.

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
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from services.common.settings import QueueSettings

EventType = Literal["token", "done", "error"]
# redis-py's replies as this module reads them (decode_responses=True).
StreamEntries = list[tuple[str, dict[str, str]]]
StreamReply = list[tuple[str, StreamEntries]] | None


@dataclass(frozen=True)
class Job:
    """What the gateway hands to a worker: a chat prompt and the caller's deadline."""

    messages: list[dict[str, str]]
    deadline: float
    stream: bool = False
    max_tokens: int | None = None
    request_id: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    enqueued_at: float = field(default_factory=time.time)

    def encode(self) -> dict[str, str]:
        return {"job": json.dumps(asdict(self), separators=(",", ":"))}

    @classmethod
    def decode(cls, fields: dict[str, str]) -> Job:
        data = json.loads(fields["job"])
        return cls(**data)

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) >= self.deadline


@dataclass(frozen=True)
class Event:
    type: EventType
    attempt: int
    data: dict[str, Any]

    @classmethod
    def decode(cls, fields: dict[str, str]) -> Event:
        return cls(type=fields["type"], attempt=int(fields["attempt"]), data=json.loads(fields["data"]))  # type: ignore[arg-type]


def make_redis(settings: QueueSettings) -> Redis:
    """A client that fails fast: connect and read timeouts, so an outage is an error, not a hang.

    A command that meets a broken connection is sent once more, at once, on a new
    one: after Redis restarts, every pooled connection is stale and would
    otherwise fail one command each. While Redis is down the second try is
    refused as quickly as the first. Timeouts are not tried again, so a Redis
    that accepts but does not answer costs one ``socket_timeout``, not two.
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": 2.0,
        "socket_timeout": 10.0,
        "health_check_interval": 15,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    }
    if settings.redis_sentinels:
        hosts = []
        for item in settings.redis_sentinels.split(","):
            host, _, port = item.strip().rpartition(":")
            hosts.append((host, int(port)))
        url_options = Redis.from_url(settings.redis_url).connection_pool.connection_kwargs
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts,
            sentinel_kwargs={"socket_connect_timeout": 2.0, "socket_timeout": 2.0},
            password=url_options.get("password"),
            db=url_options.get("db", 0),
            **options,
        )
        master: Redis = sentinel.master_for(settings.redis_sentinel_master)
        return master
    return Redis.from_url(settings.redis_url, **options)


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
        self.dead_letter = settings.llm_dead_letter_stream
        self.ttl = settings.llm_result_ttl_seconds

    def events_key(self, job_id: str) -> str:
        return f"{self.stream}:events:{job_id}"

    def answered_key(self, job_id: str) -> str:
        return f"{self.stream}:answered:{job_id}"

    def tries_key(self) -> str:
        return f"{self.stream}:tries"

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

    async def enqueue(self, job: Job) -> str:
        message_id = await self.redis.xadd(self.stream, job.encode())  # type: ignore[arg-type]
        return str(message_id)

    async def publish(self, job_id: str, event_type: EventType, attempt: int, data: dict[str, Any]) -> None:
        key = self.events_key(job_id)
        fields = {"type": event_type, "attempt": str(attempt), "data": json.dumps(data, separators=(",", ":"))}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(key, fields)  # type: ignore[arg-type]
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
