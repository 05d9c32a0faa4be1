"""Settings of the gateway."""

from __future__ import annotations

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from services.common.settings import EmbeddingSettings, QueueSettings, ServiceSettings
from services.gateway.prompt import SYSTEM
from services.gateway.tenants import KeyEntry, read_keys_file


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
    ingest_chars_per_second: float = Field(
        2000.0,
        gt=0,
        description="The slowest indexing rate waited for: documents of N characters wait "
        "RAG_UPSTREAM_TIMEOUT_SECONDS + N / this for the retriever.",
    )
    file_parse_workers: int = Field(
        2, ge=1, description="Processes that parse uploaded files, one file each at a time."
    )
    file_parse_timeout_seconds: float = Field(
        30.0, gt=0, description="Longest one file may take to parse; its process is stopped and the file refused."
    )
    file_parse_memory_mb: int = Field(1024, ge=256, description="Address space of a process that parses files.")
    file_max_unpacked_bytes: int = Field(
        100 * 1024 * 1024, ge=1024, description=".docx: most bytes its zip members may unpack to, added up."
    )
    file_max_paragraphs: int = Field(100_000, ge=1, description=".docx: most paragraphs and table rows.")
    file_max_pages: int = Field(2000, ge=1, description="PDF: most pages.")
    file_max_content_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="PDF: most bytes of page content (decoded), over all its pages."
    )
    api_keys: str = Field(
        "",
        description="Comma-separated API keys or sha256:<hex> digests of them; empty disables authentication.",
    )
    api_keys_file: str = Field(
        "",
        description="A YAML file of keys, each with its tenant and scopes: a list of {key | sha256, tenant, "
        "scopes: [read, write]}; read at start. Empty: none (RAG_API_KEYS alone).",
    )
    require_api_keys: bool = Field(
        False,
        description="Refuse to start without API keys (RAG_API_KEYS or RAG_API_KEYS_FILE): the Kubernetes base sets "
        "it, so an open API there is a choice (false), never a missing Secret.",
    )
    rate_limit_per_minute: int = Field(
        0, ge=0, description="Requests per minute per API key (per client address without keys), in Redis; 0 disables."
    )
    tenant_rate_limit_per_minute: int = Field(
        0,
        ge=0,
        description="Requests per minute per tenant, all its keys together (every caller is the default tenant's "
        "without keys), in Redis, on top of the limit per key; 0 disables.",
    )
    auth_failures_per_minute: int = Field(
        10,
        ge=0,
        description="Failed authentications per minute per client address; beyond them the address gets 429 "
        "(Retry-After) on every request until the minute frees; 0 disables.",
    )
    rate_limit_fail_open: bool = Field(
        True, description="When Redis does not answer the rate limiter: let requests through (true) or answer 503."
    )
    max_body_bytes: int = Field(
        25 * 1024 * 1024, ge=1024, description="Largest request body; a larger one is answered 413 unread."
    )
    max_concurrent_requests: int = Field(
        1000,
        ge=0,
        description="Requests one gateway process serves at once (/healthz, /readyz and /metrics not counted); "
        "beyond them 503 busy with Retry-After; 0: no limit.",
    )
    max_concurrent_uploads: int = Field(
        4,
        ge=0,
        description="File uploads (POST /v1/files) one gateway process receives at once; beyond them 503 busy with "
        "Retry-After before the body is read. Each may spool up to RAG_MAX_BODY_BYTES to /tmp: size /tmp for "
        "both multiplied. 0: no limit.",
    )
    chat_history_chars: int = Field(
        4000, ge=0, description="Characters of earlier chat turns kept in the prompt (newest first)."
    )
    served_model: str = Field("ragpod", min_length=1, description="Model name /v1/models lists.")
    retry_after_seconds: int = Field(2, ge=1, description="Retry-After sent with a 503 for a full queue.")
    require_llm_workers: bool = Field(
        False,
        description="Answer a question that needs generation 503 at once, with Retry-After, while no LLM worker is "
        "live (none has sent a heartbeat lately: the tier is scaled to zero or not started yet) instead of queueing "
        "a job nobody takes; the Kubernetes base sets it.",
    )
    no_workers_retry_after_seconds: int = Field(
        60, ge=1, description="Retry-After sent with the 503 for no live LLM worker (RAG_REQUIRE_LLM_WORKERS)."
    )
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

    _key_entries: list[KeyEntry] = PrivateAttr(default_factory=list)

    @property
    def key_entries(self) -> list[KeyEntry]:
        """The entries of RAG_API_KEYS_FILE, read once when the settings were made."""
        return self._key_entries

    def ingest_timeout(self, chars: int) -> float:
        """How long indexing ``chars`` characters may take: the work grows with them, and so does the wait."""
        return self.upstream_timeout_seconds + chars / self.ingest_chars_per_second

    @field_validator("min_relevance", "min_support", "min_question_support")
    @classmethod
    def _unit_interval(cls, value: float, info: ValidationInfo) -> float:
        if not 0.0 <= value <= 1.0:  # also refuses NaN
            raise ValueError(f"RAG_{str(info.field_name).upper()} must be between 0 and 1, got {value}")
        return value

    @model_validator(mode="after")
    def _keys_when_required(self) -> Settings:
        if self.api_keys_file.strip():
            self._key_entries = read_keys_file(self.api_keys_file.strip())
        if self.require_api_keys and not any(key.strip() for key in self.api_keys.split(",")) and not self._key_entries:
            raise ValueError(
                "RAG_REQUIRE_API_KEYS is true but RAG_API_KEYS holds no key (nor RAG_API_KEYS_FILE): set the keys "
                "(on Kubernetes, the Secret gateway-api-keys) or set RAG_REQUIRE_API_KEYS=false if an open API is "
                "intended"
            )
        return self
