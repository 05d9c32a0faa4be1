from __future__ import annotations

from pydantic import BaseModel, Field

from services.common.schemas import DocumentsRequest, DocumentsResponse, FilterValue, NonBlankStr, Source

__all__ = ["AskRequest", "AskResponse", "DocumentsRequest", "DocumentsResponse", "Source", "Timings"]


class AskRequest(BaseModel):
    question: NonBlankStr = Field(..., min_length=1, description="The question, in plain text.")
    top_k: int = Field(5, ge=1, description="How many chunks to retrieve as context.")
    filters: dict[str, FilterValue] | None = Field(None, description="Metadata fields that sources must match.")
    stream: bool = Field(False, description="Answer as server-sent events, token by token.")


class Timings(BaseModel):
    embed_ms: float
    search_ms: float
    queue_ms: float
    generate_ms: float
    total_ms: float


class AskResponse(BaseModel):
    answer: str
    sources: list[Source]
    timings: Timings
    model: str = ""
