"""Settings shared by every service.

Each service has one typed ``Settings`` class built from environment variables
with the ``RAG_`` prefix. They are read once at start (in ``create_app`` or the
worker's entry point) and passed down; nothing else reads ``os.environ``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["debug", "info", "warning", "error"]


class ServiceSettings(BaseSettings):
    """Fields every service has: where it listens and how it logs."""

    model_config = SettingsConfigDict(env_prefix="RAG_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Interface the HTTP server binds to.")
    port: int = Field(0, ge=1, le=65535, description="HTTP port (each service sets its own default).")
    log_level: LogLevel = "info"
    log_json: bool = Field(True, description="JSON logs (true) or human-readable console logs (false).")
    shutdown_grace_seconds: float = Field(
        20.0, ge=0, description="On SIGTERM, how long requests in flight may finish (below the pod's grace period)."
    )
    request_read_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="How long a client may take to send a request's headers (from the moment its connection opens "
        "or its last answer ends), and then its body; a slower connection is closed.",
    )


class QueueSettings(BaseSettings):
    """The Redis Stream between the gateway and the LLM workers (both read these)."""

    model_config = SettingsConfigDict(env_prefix="RAG_", extra="ignore", frozen=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the LLM job stream and results.")
    redis_sentinels: str = Field(
        "", description="Comma-separated host:port of Redis Sentinels; when set, RAG_REDIS_URL's host is ignored."
    )
    redis_sentinel_master: str = Field("ragpod", description="Name of the primary the Sentinels watch.")
    redis_max_connections: int = Field(
        100, ge=1, description="Connections each process keeps to Redis at most (its pool's size)."
    )
    redis_pool_timeout_seconds: float = Field(
        2.0,
        gt=0,
        description="How long a command waits for a free connection when all are in use; then 503 busy.",
    )
    llm_stream: str = Field("rag:llm:jobs", min_length=1, description="Stream of LLM jobs.")
    llm_group: str = Field("rag-llm-workers", min_length=1, description="Consumer group of the LLM workers.")
    llm_dead_letter_stream: str = Field("rag:llm:dead", min_length=1, description="Where jobs go after too many tries.")
    llm_result_ttl_seconds: int = Field(300, ge=1, description="How long a job's result events are kept.")
    llm_dead_letter_max_len: int = Field(
        10000, ge=1, description="Most entries kept in the dead-letter stream; older ones are trimmed and counted."
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("RAG_REDIS_URL must start with redis://, rediss:// or unix://")
        return value


class EmbeddingSettings(BaseSettings):
    """Where the embedding service is (every service that embeds reads these)."""

    model_config = SettingsConfigDict(env_prefix="RAG_", extra="ignore", frozen=True)

    embedding_url: str = Field("http://127.0.0.1:8001", description="Base URL of the embedding service (the GPU one).")
    embedding_cpu_url: str = Field(
        "", description="Base URL of the CPU embedding service, used when the first answers 503, times out or is down."
    )
    embedding_spill_cooldown_seconds: float = Field(
        5.0, ge=0, description="After a timeout or refused connection, how long requests go straight to the CPU one."
    )
