"""What travels on the queue: the gateway's ``Job`` and the worker's ``Event``s.

Both ignore fields they do not know, so during a rolling deploy a worker reads
jobs from a newer gateway and a gateway reads events from a newer worker.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EventType = Literal["token", "done", "error"]


class Job(BaseModel):
    """What the gateway hands to a worker: a chat prompt and the caller's deadline."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    messages: list[dict[str, str]]
    deadline: float
    stream: bool = False
    max_tokens: int | None = None
    request_id: str = ""
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    enqueued_at: float = Field(default_factory=time.time)

    def encode(self) -> dict[str, str]:
        return {"job": self.model_dump_json()}

    @classmethod
    def decode(cls, fields: dict[str, str]) -> Job:
        return cls.model_validate_json(fields["job"])

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) >= self.deadline


class Event(BaseModel):
    """One entry of a job's event stream: ``token`` while streaming, then one ``done`` or ``error``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: EventType
    attempt: int
    data: dict[str, Any]

    def encode(self) -> dict[str, str]:
        return {"type": self.type, "attempt": str(self.attempt), "data": json.dumps(self.data, separators=(",", ":"))}

    @classmethod
    def decode(cls, fields: dict[str, str]) -> Event:
        return cls.model_validate({**fields, "data": json.loads(fields["data"])})
