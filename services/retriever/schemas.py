from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from services.common.schemas import (
    DocumentsDelete,
    DocumentsDeleted,
    DocumentsRequest,
    DocumentsResponse,
    SearchRequest,
    SearchResponse,
)

__all__ = [
    "DocumentEntry",
    "DocumentList",
    "DocumentsDelete",
    "DocumentsDeleted",
    "DocumentsRequest",
    "DocumentsResponse",
    "SearchRequest",
    "SearchResponse",
    "StatsResponse",
]


class StatsResponse(BaseModel):
    collection: str
    points: int
    store: str
    search_mode: str
    search_fusion: str = Field(..., description="How hybrid search fuses its dense and keyword lists: rrf or dbsf.")


class DocumentEntry(BaseModel):
    id: str
    chunks: int = Field(..., description="Chunks stored for the document.")
    metadata: dict[str, Any]


class DocumentList(BaseModel):
    documents: list[DocumentEntry]
    next_cursor: str | None = Field(None, description="Pass as cursor for the next page; null on the last page.")
