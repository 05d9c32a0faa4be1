"""The Redis client of both sides of the queue."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from services.common.settings import QueueSettings


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
        master: Redis = sentinel.master_for(settings.redis_sentinel_master)
        return master
    return Redis.from_url(settings.redis_url, **options)
