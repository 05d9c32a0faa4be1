"""Settings of the gateway."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator

from services.common.settings import EmbeddingSettings, QueueSettings, ServiceSettings
from services.gateway.prompt import SYSTEM


class Settings(ServiceSettings, QueueSettings, EmbeddingSettings):
    port: int = Field(8000, ge=1, le=65535)
    retriever_url: str = Field("http://127.0.0.1:8002", description="Base URL of the retriever.")
    max_queue_depth: int = Field(64, ge=1, description="Queue depth above which /v1/ask answers 503 at once.")
    ask_timeout_seconds: float = Field(120.0, gt=0, description="Deadline of one /v1/ask, queue wait included.")
    upstream_timeout_seconds: float = Field(
        60.0, gt=0, description="Timeout of calls to the retriever and the embedding service."
    )
    top_k_max: int = Field(20, ge=1, le=100, description="Largest top_k accepted.")
    max_question_chars: int = Field(2000, ge=1)
    max_documents_per_request: int = Field(256, ge=1)
    max_document_chars: int = Field(1_000_000, ge=1)
    api_keys: str = Field(
        "",
        description="Comma-separated API keys or sha256:<hex> digests of them; empty disables authentication.",
    )
    rate_limit_per_minute: int = Field(
        0, ge=0, description="Requests per minute per API key (per client address without keys), in Redis; 0 disables."
    )
    rate_limit_fail_open: bool = Field(
        True, description="When Redis does not answer the rate limiter: let requests through (true) or answer 503."
    )
    max_body_bytes: int = Field(
        25 * 1024 * 1024, ge=1024, description="Largest request body; a larger one is answered 413 unread."
    )
    chat_history_chars: int = Field(
        4000, ge=0, description="Characters of earlier chat turns kept in the prompt (newest first)."
    )
    served_model: str = Field("ragpod", min_length=1, description="Model name /v1/models lists.")
    retry_after_seconds: int = Field(2, ge=1, description="Retry-After sent with a 503 for a full queue.")
    max_context_chars: int = Field(
        700,
        ge=100,
        description="Characters of the sources' sentences put into the prompt, those most similar to the question "
        "first: a few sentences suit the packaged 135M model; raise it (e.g. 4000) for a larger model.",
    )
    system_prompt: str = Field(SYSTEM, min_length=1, description="The system message put before the sources.")
    min_relevance: float = Field(
        0.25,
        description="Sources whose score (dense cosine similarity to the question) is below this are not given to the "
        "model; when none is left the question is answered as not covered, without a job.",
    )
    min_support: float = Field(
        0.6, description="Support (0..1) every answer sentence needs for the answer to count as grounded."
    )
    min_question_support: float = Field(
        0.53,
        description="Similarity (0..1) to the question that some sentence of the sources needs for an answer to be "
        "given; below it the question is answered as not covered, after generation.",
    )

    @field_validator("min_relevance", "min_support", "min_question_support")
    @classmethod
    def _unit_interval(cls, value: float, info: ValidationInfo) -> float:
        if not 0.0 <= value <= 1.0:  # also refuses NaN
            raise ValueError(f"RAG_{str(info.field_name).upper()} must be between 0 and 1, got {value}")
        return value
