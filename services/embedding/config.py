"""Settings of the embedding service."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.common.settings import ServiceSettings


class Settings(ServiceSettings):
    port: int = Field(8001, ge=1, le=65535)
    embedding_model: str = Field(
        "",
        description="Path of a sentence-transformers model; empty means the packaged all-MiniLM-L6-v2.",
    )
    embedding_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when a GPU is present, else the CPU."
    )
    embedding_max_batch: int = Field(64, ge=1, le=1024, description="Largest micro-batch handed to the model.")
    embedding_max_wait_ms: float = Field(5.0, ge=0, le=1000, description="How long a batch waits to fill.")
    embedding_max_texts: int = Field(512, ge=1, description="Most texts accepted in one request.")
    embedding_max_text_chars: int = Field(20_000, ge=1, description="Longest text accepted.")
