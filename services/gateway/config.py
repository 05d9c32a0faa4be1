"""Settings of the gateway."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import QueueSettings, ServiceSettings
from services.gateway.prompt import SYSTEM


class Settings(ServiceSettings, QueueSettings):
    port: int = Field(8000, ge=1, le=65535)
    retriever_url: str = Field("http://127.0.0.1:8002", description="Base URL of the retriever.")
    max_queue_depth: int = Field(64, ge=1, description="Queue depth above which /v1/ask answers 503 at once.")
    ask_timeout_seconds: float = Field(120.0, gt=0, description="Deadline of one /v1/ask, queue wait included.")
    upstream_timeout_seconds: float = Field(60.0, gt=0, description="Timeout of calls to the retriever.")
    top_k_max: int = Field(20, ge=1, le=100, description="Largest top_k accepted.")
    max_question_chars: int = Field(2000, ge=1)
    max_documents_per_request: int = Field(256, ge=1)
    max_document_chars: int = Field(1_000_000, ge=1)
    api_keys: str = Field("", description="Comma-separated API keys; empty disables authentication.")
    rate_limit_per_minute: int = Field(0, ge=0, description="Requests per minute per client; 0 disables.")
    retry_after_seconds: int = Field(2, ge=1, description="Retry-After sent with a 503 for a full queue.")
    max_context_chars: int = Field(6000, ge=100, description="Characters of retrieved text put into the prompt.")
    system_prompt: str = Field(SYSTEM, min_length=1, description="The system message put before the sources.")
