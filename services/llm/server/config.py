"""Settings of the CPU model server (``python -m services.llm.server``).

The same ``RAG_LLM_*`` names as the worker's local engine, so one ConfigMap can
describe the model for both; the port is its own, ``RAG_LLM_SERVE_PORT``, so it
never takes the worker's side port (``RAG_PORT``) in a pod they share.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from services.common.devices import DeviceChoice
from services.common.settings import ServiceSettings
from services.llm.local import LocalOptions


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAG_", extra="ignore", frozen=True, populate_by_name=True)

    port: int = Field(
        8004,
        ge=1,
        le=65535,
        validation_alias=AliasChoices("RAG_LLM_SERVE_PORT"),
        description="Port of the model server (vLLM's --port).",
    )
    llm_model_path: str = Field(
        "", description="GGUF file or model directory; empty means the packaged SmolLM2-135M-Instruct."
    )
    llm_device: DeviceChoice = Field("auto", description="auto: CUDA (float16) when present, else the CPU.")
    llm_model_cache_dir: str = Field(
        "data/models", description="Where a GGUF model is kept converted for fast reloads; empty disables."
    )
    llm_model_name: str = Field("smollm2-135m-instruct", description="The served model name (--served-model-name).")
    llm_max_new_tokens: int = Field(64, ge=1, le=8192, description="Tokens per answer when a request sets none.")
    llm_temperature: float = Field(0.0, ge=0.0, le=2.0, description="Temperature when a request sets none.")
    llm_concurrency: int = Field(4, ge=1, le=256, description="Sequences decoded together (vLLM's --max-num-seqs).")
    llm_batch_wait_ms: float = Field(10.0, ge=0, le=1000, description="How long a batch waits to fill.")

    def local_options(self) -> LocalOptions:
        return LocalOptions(
            model_path=self.llm_model_path,
            device=self.llm_device,
            cache_dir=self.llm_model_cache_dir,
            model_name=self.llm_model_name,
            max_batch=self.llm_concurrency,
            batch_wait_ms=self.llm_batch_wait_ms,
        )
