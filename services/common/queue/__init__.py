"""The Redis Streams protocol between the gateway and the LLM workers, both sides.

Every Redis stream command and every key of the queue lives in this package:
the gateway enqueues and follows a job's events through ``JobQueue``; the
worker reads, claims, counts tries, acknowledges, retries, dead-letters, hands
back and answers through it, and says it is alive (``heartbeat``) so the gateway can count live
workers (``live_workers``). ``protocol.py`` says how.
"""

from services.common.queue.connection import PoolExhausted, make_redis
from services.common.queue.models import Event, EventType, Job
from services.common.queue.protocol import HEARTBEAT_SECONDS, Delivery, JobQueue

__all__ = ["HEARTBEAT_SECONDS", "Delivery", "Event", "EventType", "Job", "JobQueue", "PoolExhausted", "make_redis"]
