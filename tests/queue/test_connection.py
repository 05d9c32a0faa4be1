"""The Redis pool of both sides: at most RAG_REDIS_MAX_CONNECTIONS connections; a command that finds them all
in use waits RAG_REDIS_POOL_TIMEOUT_SECONDS for one, then fails as ``PoolExhausted`` (busy), not as an outage,
with a plain URL and behind Sentinel alike."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from ragpod.processes import free_port, wait_until
from services.common.queue import PoolExhausted, make_redis
from services.common.settings import QueueSettings
from tests.fixtures.redis import RedisServer


@pytest.fixture
def sentinel(redis_server: RedisServer, tmp_path: Path) -> Iterator[str]:
    """A real Redis Sentinel watching the session's Redis as the primary ``ragpod``; its ``host:port``."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("Debian's redis-server is needed for a Sentinel (make test installs it)")
    port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor ragpod 127.0.0.1 {redis_server.port} 1\n")
    proc = subprocess.Popen([server, str(config), "--sentinel"], stdout=subprocess.DEVNULL)
    try:
        probe = Redis(port=port, decode_responses=True)

        async def primary_known() -> bool:
            try:
                return bool(await probe.execute_command("SENTINEL", "get-master-addr-by-name", "ragpod"))
            finally:
                await probe.aclose()

        wait_until(lambda: asyncio.run(primary_known()), 30, "sentinel")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def hold(redis: Redis, seconds: float) -> None:
    """Keeps one connection of the pool busy for ``seconds`` (a blocking read, as a caller waiting for a job)."""
    await redis.xread({"nothing-here": "$"}, block=int(seconds * 1000))


async def check_bound(settings: QueueSettings) -> None:
    redis = make_redis(settings)
    try:
        assert await redis.ping()
        holders = [asyncio.create_task(hold(redis, 1.5)) for _ in range(2)]
        await asyncio.sleep(0.2)  # both connections taken
        started = time.monotonic()
        with pytest.raises(PoolExhausted, match="all 2 Redis connections"):
            await redis.ping()
        waited = time.monotonic() - started
        assert waited >= 0.25  # it waited its pool timeout for a free connection
        assert not any(holder.done() for holder in holders)  # and gave up before one came free
        assert not issubclass(PoolExhausted, RedisConnectionError)  # not sent again, not taken for an outage
        # A command that waits less than the timeout gets the first connection that comes free.
        await asyncio.gather(*holders)
        assert await redis.ping()
        pool = redis.connection_pool
        assert len(pool._in_use_connections) == 0  # type: ignore[attr-defined]
    finally:
        await redis.aclose()


async def test_a_plain_url_pool_waits_for_a_free_connection_then_says_busy(redis_server: RedisServer) -> None:
    await check_bound(
        QueueSettings(redis_url=redis_server.url, redis_max_connections=2, redis_pool_timeout_seconds=0.3)
    )


async def test_a_sentinel_pool_is_bounded_the_same_way(sentinel: str) -> None:
    settings = QueueSettings(
        redis_sentinels=sentinel,
        redis_sentinel_master="ragpod",
        redis_max_connections=2,
        redis_pool_timeout_seconds=0.3,
    )
    await check_bound(settings)
    # The connections it makes go to the primary the Sentinel names, as before.
    redis = make_redis(settings)
    try:
        await redis.set("via-sentinel", "1")
        assert await redis.get("via-sentinel") == "1"
    finally:
        await redis.aclose()
