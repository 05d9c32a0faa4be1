"""The Redis client of both sides of the queue, and its bounded connection pool.

Each process keeps at most ``RAG_REDIS_MAX_CONNECTIONS`` connections to Redis. A command that finds them all in
use waits up to ``RAG_REDIS_POOL_TIMEOUT_SECONDS`` for one to come free, then fails with ``PoolExhausted``: the
process is busy, Redis is not down, and a caller answers that as a 503 ``busy``, never as an outage. With a plain
URL the pool is redis-py's ``BlockingConnectionPool``; Sentinel's pool has no blocking form, so
``BoundedSentinelPool`` bounds it with a semaphore of the same size.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from services.common.settings import QueueSettings


class PoolExhausted(RedisError):
    """Every connection of this process's pool stayed in use for the pool's timeout. Not a connection error:
    nothing sends the command again, and nothing takes it for Redis being down."""


def _exhausted(max_connections: int, timeout: float | None) -> PoolExhausted:
    return PoolExhausted(f"all {max_connections} Redis connections of this process in use for {timeout:g} s")


class BoundedPool(BlockingConnectionPool):
    """redis-py's blocking pool, failing with ``PoolExhausted`` when no connection comes free in time."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        try:
            connection: AbstractConnection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisConnectionError as exc:
            if isinstance(exc.__cause__, TimeoutError):  # the wait for a free connection timed out
                raise _exhausted(self.max_connections, self.timeout) from exc
            raise
        return connection


class BoundedSentinelPool(SentinelConnectionPool):
    """Sentinel's pool with at most ``max_connections`` in use: a command waits up to ``pool_timeout`` s for one."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        self.pool_timeout: float = kwargs.pop("pool_timeout")
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._slots = asyncio.Semaphore(self.max_connections)

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        try:
            async with asyncio.timeout(self.pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise _exhausted(self.max_connections, self.pool_timeout) from None
        try:
            connection: AbstractConnection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except BaseException:
            self._slots.release()
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        try:
            await super().release(connection)
        finally:
            self._slots.release()


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
        sentinel = Sentinel(
            hosts,
            sentinel_kwargs={"socket_connect_timeout": 2.0, "socket_timeout": 2.0},
            password=url_options.get("password"),
            db=url_options.get("db", 0),
            **options,
        )
        master: Redis = sentinel.master_for(
            settings.redis_sentinel_master,
            connection_pool_class=BoundedSentinelPool,
            max_connections=settings.redis_max_connections,
            pool_timeout=settings.redis_pool_timeout_seconds,
        )
        return master
    pool = BoundedPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout_seconds,
        **options,
    )
    return Redis.from_pool(pool)
