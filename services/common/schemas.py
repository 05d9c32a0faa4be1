"""Request and response bodies that more than one service speaks."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

FilterValue = str | int | bool


def not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace")
    return value


class Document(BaseModel):
    id: str = Field(..., min_length=1, max_length=512, description="Stable id: sending it again replaces the document.")
    text: str = Field(..., min_length=1, description="The document's text.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Returned with every source from this document.")

    _id_not_blank = field_validator("id")(not_blank)
    _text_not_blank = field_validator("text")(not_blank)


class DocumentsRequest(BaseModel):
    documents: list[Document] = Field(..., min_length=1, description="Documents to index.")

    @model_validator(mode="after")
    def _unique_ids(self) -> DocumentsRequest:
        seen: set[str] = set()
        for doc in self.documents:
            if doc.id in seen:
                raise ValueError(f"documents: id {doc.id!r} appears more than once")
            seen.add(doc.id)
        return self


class DocumentsResponse(BaseModel):
    indexed: int = Field(..., description="Documents indexed.")
    chunks: int = Field(..., description="Chunks written for them.")


class SearchRequest(BaseModel):
    query: str = Field(..., min_length=1)
    top_k: int = Field(5, ge=1, le=100)
    filters: dict[str, FilterValue] | None = Field(None, description="Metadata fields that must equal these values.")

    _query_not_blank = field_validator("query")(not_blank)


class Source(BaseModel):
    document_id: str
    chunk: int
    score: float
    text: str
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    hits: list[Source]
    embed_ms: float
    search_ms: float
