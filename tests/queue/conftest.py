"""Fixtures of the queue's tests beyond the session-wide ones."""

from tests.fixtures.redis_proxy import redis_proxy

__all__ = ["redis_proxy"]
