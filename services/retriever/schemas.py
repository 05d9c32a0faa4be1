from __future__ import annotations

from pydantic import BaseModel

from services.common.schemas import DocumentsRequest, DocumentsResponse, SearchRequest, SearchResponse

__all__ = ["DocumentsRequest", "DocumentsResponse", "SearchRequest", "SearchResponse", "StatsResponse"]


class StatsResponse(BaseModel):
    collection: str
    points: int
    store: str
