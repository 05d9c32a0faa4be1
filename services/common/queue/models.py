"""What travels on the queue: the gateway's ``Job`` and the worker's ``Event``s.

Both ignore fields they do not know, so during a rolling deploy a worker reads
jobs from a newer gateway and a gateway reads events from a newer worker.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EventType = Literal["token", "done", "error"]


class Job(BaseModel):
    """What the gateway hands to a worker: a chat prompt and how long its caller waits.

    ``timeout_s`` is the caller's budget counted from admission; workers measure it on Redis' clock
    (the queue stores the deadline in Redis time when it admits the job), never on their own.
    ``deadline`` and ``enqueued_at`` are the gateway's wall clock, for the gateway's own use and logs;
    a job that carries only ``deadline`` (an older gateway) gets ``timeout_s = deadline - enqueued_at``.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    messages: list[dict[str, str]]
    timeout_s: float
    deadline: float = 0.0
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None  # None: the worker's RAG_LLM_TEMPERATURE
    request_id: str = ""
    traceparent: str = ""  # the W3C trace context of the question; '' when tracing is off
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    enqueued_at: float = Field(default_factory=time.time)

    @model_validator(mode="before")
    @classmethod
    def _budget_from_deadline(cls, data: Any) -> Any:
        if isinstance(data, dict) and "timeout_s" not in data and "deadline" in data:
            data = {**data, "enqueued_at": data.get("enqueued_at", time.time())}
            data["timeout_s"] = float(data["deadline"]) - float(data["enqueued_at"])
        return data

    def encode(self) -> dict[str, str]:
        """The fields of a stream entry added without the queue's admission (tests, tools)."""
        return {"job": self.model_dump_json()}

    @classmethod
    def decode(cls, fields: dict[str, str]) -> Job:
        return cls.model_validate_json(fields["job"])


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
