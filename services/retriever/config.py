"""Settings of the retriever."""

from __future__ import annotations

from pydantic import Field, model_validator

from services.common.settings import ServiceSettings


class Settings(ServiceSettings):
    port: int = Field(8002, ge=1, le=65535)
    embedding_url: str = Field("http://127.0.0.1:8001", description="Base URL of the embedding service.")
    qdrant_url: str = Field("", description="Qdrant server URL; empty means local mode on RAG_QDRANT_PATH.")
    qdrant_api_key: str = Field("", description="API key for a Qdrant server.")
    qdrant_path: str = Field("data/qdrant", description="Directory of the local-mode Qdrant store.")
    qdrant_collection: str = Field("ragpod_chunks", min_length=1)
    chunk_size: int = Field(800, ge=50, le=20_000, description="Target chunk length in characters.")
    chunk_overlap: int = Field(160, ge=0, description="Characters shared by neighbouring chunks.")
    embed_batch_size: int = Field(64, ge=1, le=1024, description="Chunks per embedding call while indexing.")
    upstream_timeout_seconds: float = Field(30.0, gt=0, description="Timeout of calls to the embedding service.")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> Settings:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError("RAG_CHUNK_OVERLAP must be smaller than RAG_CHUNK_SIZE")
        return self
