from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from services.common.openai_schemas import ChatCompletion
from services.common.schemas import DocumentsRequest, DocumentsResponse, Filters, NonBlankStr, Source

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


AnswerKind = Literal["generated", "extractive", "not_covered"]
ANSWER_KIND_DESCRIPTION = (
    "generated: the model's text, every sentence of which passed the check; extractive: it did not, and the best "
    "supporting sentences of the sources are quoted with their [n]; not_covered: refused, before or after generation."
)


class AskRequest(BaseModel):
    question: NonBlankStr = Field(..., min_length=1, description="The question, in plain text.")
    top_k: int = Field(5, ge=1, description="How many chunks to retrieve as context.")
    filters: Filters | None = Field(None, description="Metadata fields that sources must match.")
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
    answer_kind: AnswerKind = Field("generated", description=ANSWER_KIND_DESCRIPTION)
    sources: list[Source]
    citations: list[Citation] = Field(default_factory=list, description="One per sentence of the answer.")
    grounded: bool | None = Field(
        False,
        description="Every sentence of the answer passes the check: support reaches RAG_MIN_SUPPORT and its numbers "
        "and names are in its source (false when nothing was answered; null when the answer could not be "
        "attributed, see warnings).",
    )
    citation_warnings: list[CitationWarning] = Field(
        default_factory=list, description="[n] markers that name no source or a source that does not support them."
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What the answer lacks and why, e.g. no citations because attribution failed.",
    )
    timings: Timings
    model: str = ""


class SearchQuery(BaseModel):
    question: NonBlankStr = Field(..., min_length=1, description="The question, in plain text.")
    top_k: int = Field(5, ge=1, description="How many chunks to return at most.")
    filters: Filters | None = Field(None, description="Metadata fields that sources must match.")


class SearchTimings(BaseModel):
    embed_ms: float
    search_ms: float
    total_ms: float


class SearchResults(BaseModel):
    sources: list[Source] = Field(..., description="Chunks at or above the relevance floor, best first.")
    timings: SearchTimings


class DocumentInfo(BaseModel):
    id: str
    chunks: int = Field(..., description="Chunks stored for the document.")
    metadata: dict[str, Any]


class DocumentList(BaseModel):
    documents: list[DocumentInfo]
    next_cursor: str | None = Field(None, description="Pass as cursor to get the next page; null on the last.")


class FileIndexed(BaseModel):
    id: str
    title: str
    format: str
    chars: int = Field(..., description="Characters of text taken from the file.")


class FilesResponse(BaseModel):
    indexed: int = Field(..., description="Files indexed.")
    chunks: int = Field(..., description="Chunks written for them.")
    files: list[FileIndexed]


class ErrorBody(BaseModel):
    error: str = Field(..., description="The kind of error, e.g. validation_error, not_found, upstream_unavailable.")
    detail: str = Field(..., description="What happened, in words; a bad field is named first.")


_ERROR_DESCRIPTIONS = {
    400: "The request cannot be read.",
    401: "Keys are set (RAG_API_KEYS, RAG_API_KEYS_FILE) and no valid key was sent.",
    403: "The key is valid but lacks the scope the route needs (read or write).",
    404: "No such document.",
    405: "The route does not take this method.",
    413: "The body is larger than RAG_MAX_BODY_BYTES; nothing was read.",
    415: "The body is not of a media type the route takes.",
    422: "Bad input; the detail names the field. Nothing was written or queued.",
    429: "Over the rate limit; Retry-After says when to try again.",
    502: "A dependency failed on the request.",
    503: "A dependency is down (named in the detail) or the LLM queue is full (with Retry-After).",
    504: "A dependency or the answer took too long.",
}


def error_responses(*statuses: int, model: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` documenting the error statuses a route can answer, in its error shape."""
    return {status: {"model": model, "description": _ERROR_DESCRIPTIONS.get(status, "Error.")} for status in statuses}


class RagpodExtra(BaseModel):
    sources: list[Source] = Field(..., description="The chunks the answer was written from, as [n] numbers them.")
    citations: list[Citation] = Field(default_factory=list, description="One per sentence of the answer.")
    grounded: bool | None = Field(
        False, description="Every sentence of the answer passes the check (null: the answer could not be attributed)."
    )
    answer_kind: AnswerKind = Field("generated", description=ANSWER_KIND_DESCRIPTION)
    citation_warnings: list[CitationWarning] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list, description="What the answer lacks and why.")
    timings: Timings
    answer: str | None = Field(
        None, description="Streams only: the whole answer, when a retried generation replaced what was streamed."
    )


class RagpodCompletion(ChatCompletion):
    """OpenAI's chat completion with one more top-level field, ``ragpod``."""

    ragpod: RagpodExtra
