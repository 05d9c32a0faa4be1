"""Settings of the LLM worker (the CPU model server has its own: ``services.llm.server.config``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.common.settings import QueueSettings, ServiceSettings


class Settings(ServiceSettings, QueueSettings):
    port: int = Field(8003, ge=1, le=65535, description="Side port for /healthz, /readyz and /metrics.")
    llm_backend: Literal["local", "openai"] = Field(
        "local", description="local: in-process transformers engine; openai: an OpenAI-compatible server."
    )
    llm_model_path: str = Field(
        "", description="GGUF file or model directory for the local engine; empty means packaged SmolLM2-135M."
    )
    llm_device: Literal["auto", "cpu", "cuda"] = "auto"
    llm_model_cache_dir: str = Field(
        "data/models", description="Where a GGUF model is kept converted for fast reloads; empty disables."
    )
    llm_openai_url: str = Field("http://127.0.0.1:8004/v1", description="Base URL of the OpenAI-compatible server.")
    llm_openai_api_key: str = Field("", description="Bearer token for the OpenAI-compatible server.")
    llm_model_name: str = Field("smollm2-135m-instruct", description="Model name sent to / served by the server.")
    llm_max_new_tokens: int = Field(64, ge=1, le=8192, description="Most tokens generated per answer.")
    llm_temperature: float = Field(0.0, ge=0.0, le=2.0)
    llm_repetition_penalty: float = Field(
        1.2,
        ge=1.0,
        le=2.0,
        description="Penalty on tokens already in the prompt or the answer (1: off); stops a small model's loops. "
        "Sent to an OpenAI-compatible server as vLLM's repetition_penalty.",
    )
    llm_stop: list[str] = Field(
        default_factory=lambda: ["\n\n"],
        description="Strings that end an answer (JSON list); the answer is the text before the first of them.",
    )
    llm_concurrency: int = Field(
        4, ge=1, le=256, description="Jobs in flight per worker, handed to the engine together."
    )
    llm_max_tries: int = Field(3, ge=1, le=100, description="Deliveries of a job before it is dead-lettered.")
    llm_visibility_timeout_seconds: float = Field(
        60.0, gt=0, description="Idle time after which another worker claims a job."
    )
    llm_drain_seconds: float = Field(30.0, ge=0, description="How long SIGTERM waits for jobs in flight.")
    llm_token_flush_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="Streaming: how long a token waits for others to be published with it in one round trip.",
    )
    llm_read_block_ms: int = Field(
        1000, ge=10, le=60_000, description="How long one read of the queue waits for a job; a stop waits for it."
    )
    llm_batch_wait_ms: float = Field(10.0, ge=0, le=1000, description="Local engine: how long a batch waits to fill.")
    llm_request_timeout_seconds: float = Field(300.0, gt=0, description="Timeout of one call to the model server.")
