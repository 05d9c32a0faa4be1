"""Settings of the retriever."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from services.common.settings import EmbeddingSettings, ServiceSettings


class Settings(ServiceSettings, EmbeddingSettings):
    port: int = Field(8002, ge=1, le=65535)
    qdrant_url: str = Field("", description="Qdrant server URL; empty means the embedded Qdrant Edge store.")
    qdrant_api_key: str = Field("", description="API key for a Qdrant server.")
    qdrant_path: str = Field("data/qdrant", description="Directory of the embedded store (one process at a time).")
    qdrant_collection: str = Field("ragpod_chunks", min_length=1)
    qdrant_replication_factor: int = Field(2, ge=1, description="Copies of each shard of a new server collection.")
    qdrant_shards: int = Field(3, ge=1, description="Shards of a new server collection.")
    qdrant_write_consistency: int = Field(
        1, ge=1, description="Replicas that must acknowledge a write to a server collection."
    )
    search_mode: Literal["hybrid", "dense"] = Field(
        "hybrid", description="hybrid: dense and keyword search fused in Qdrant; dense: vectors only."
    )
    search_fusion: Literal["rrf", "dbsf"] = Field(
        "rrf",
        description="How hybrid search fuses its two candidate lists: dbsf (distribution-based score fusion) or rrf "
        "(reciprocal rank fusion).",
    )
    chunk_size: int = Field(800, ge=50, le=20_000, description="Target chunk length in characters.")
    chunk_overlap: int = Field(160, ge=0, description="Characters shared by neighbouring chunks.")
    embed_batch_size: int = Field(64, ge=1, le=512, description="Chunks per embedding call while indexing.")
    embed_concurrency: int = Field(2, ge=1, le=16, description="Embedding calls in flight while indexing.")
    upstream_timeout_seconds: float = Field(30.0, gt=0, description="Timeout of calls to the embedding service.")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError("RAG_CHUNK_OVERLAP must be smaller than RAG_CHUNK_SIZE")
        if self.qdrant_write_consistency > self.qdrant_replication_factor:
            raise ValueError("RAG_QDRANT_WRITE_CONSISTENCY must not exceed RAG_QDRANT_REPLICATION_FACTOR")
        return self
