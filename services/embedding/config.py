"""Settings of the embedding service."""

from __future__ import annotations

from pydantic import Field, model_validator

from services.common.devices import DeviceChoice
from services.common.settings import ServiceSettings


class Settings(ServiceSettings):
    port: int = Field(8001, ge=1, le=65535)
    embedding_model: str = Field(
        "",
        description="Path of a sentence-transformers model; empty means the packaged all-MiniLM-L6-v2.",
    )
    embedding_device: DeviceChoice = Field("auto", description="auto: CUDA when a GPU is present, else the CPU.")
    embedding_max_batch: int = Field(64, ge=1, le=1024, description="Largest micro-batch handed to the model.")
    embedding_max_wait_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="Longest a batch waits to fill; it waits only until it has as many requests as the batch before.",
    )
    embedding_workers: int = Field(
        1,
        ge=1,
        le=16,
        description=(
            "Batches encoded side by side, each on a thread of its own; on a CPU torch's threads are shared out "
            "among them. 2 overlaps answering one batch with encoding the other (more texts/s under load, slower "
            "alone)."
        ),
    )
    embedding_max_texts: int = Field(512, ge=1, description="Most texts accepted in one request.")
    embedding_max_text_chars: int = Field(20_000, ge=1, description="Longest text accepted.")
    embedding_max_pending: int = Field(
        2048,
        ge=1,
        description="Most texts waiting for a batch; beyond it a request is answered 503 with Retry-After.",
    )
    embedding_retry_after_seconds: int = Field(1, ge=0, description="Retry-After sent with that 503.")

    @model_validator(mode="after")
    def _pending_holds_a_request(self) -> Settings:
        if self.embedding_max_pending < self.embedding_max_texts:
            raise ValueError(
                "RAG_EMBEDDING_MAX_PENDING must be at least RAG_EMBEDDING_MAX_TEXTS "
                f"({self.embedding_max_pending} < {self.embedding_max_texts}): the largest request could never wait"
            )
        return self
