from __future__ import annotations

from pydantic import BaseModel, Field

from services.common.schemas import DocumentsRequest, DocumentsResponse, FilterValue, NonBlankStr, Source

__all__ = [
    "AskRequest",
    "AskResponse",
    "Citation",
    "CitationWarning",
    "DocumentsRequest",
    "DocumentsResponse",
    "Source",
    "Timings",
]


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


class Citation(BaseModel):
    sentence: str = Field(..., description="One sentence of the answer, as written.")
    source: int = Field(..., ge=1, description="1-based number of the source that supports it best, as in [n].")
    support: float = Field(..., description="Cosine similarity of the sentence to the closest sentence of that source.")


class CitationWarning(BaseModel):
    sentence: str = Field(..., description="The sentence that carries the marker.")
    marker: int = Field(..., description="The n of the [n] marker the model wrote.")
    source: int = Field(..., ge=1, description="The source computed to support the sentence best.")
    support: float = Field(..., description="Support of the sentence by the marked source (0 when it names none).")
    detail: str


class AskResponse(BaseModel):
    answer: str
    sources: list[Source]
    citations: list[Citation] = Field(default_factory=list, description="One per sentence of the answer.")
    grounded: bool = Field(
        False, description="Every sentence reaches RAG_MIN_SUPPORT (false when nothing was answered)."
    )
    citation_warnings: list[CitationWarning] = Field(
        default_factory=list, description="[n] markers that name no source or a source that does not support them."
    )
    timings: Timings
    model: str = ""
