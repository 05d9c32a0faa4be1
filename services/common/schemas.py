"""Request and response bodies that more than one service speaks."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, field_validator

# Integers within Qdrant's 64-bit range: a larger one is a 422 naming the field, not a failure in the store.
FilterValue = str | Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | bool
# A metadata field name as a filter names it: letters, digits, "_" and "-" (the vector store reads it as a
# path under "metadata", where dots, brackets and quotes would mean something else).
FilterKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
Filters = dict[FilterKey, FilterValue]


def not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace")
    return value


# The pattern tells OpenAPI readers (and generated clients and fuzzers) what not_blank checks.
NonBlankStr = Annotated[str, AfterValidator(not_blank), Field(json_schema_extra={"pattern": r"\S"})]


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def addressable(value: str) -> str:
    """A document id must be addressable as ``/v1/documents/{id}``: no control character (a server's path
    matching stops at a newline) and no ``/``-separated part that is ``.`` or ``..`` (clients and proxies
    resolve those before sending)."""
    if _CONTROL.search(value):
        raise ValueError("must not hold control characters (a newline, a tab, ...)")
    if any(part in (".", "..") for part in value.split("/")):
        raise ValueError("must not have a part between slashes that is . or .. (a URL cannot address it)")
    return value


class Document(BaseModel):
    id: Annotated[NonBlankStr, AfterValidator(addressable)] = Field(
        ...,
        min_length=1,
        max_length=512,
        description="Stable id: sending it again replaces the document. Ids may hold /; no control characters "
        "and no part between slashes that is . or ..",
    )
    text: NonBlankStr = Field(..., min_length=1, description="The document's text.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Returned with every source from this document.")

    _text_not_blank = field_validator("text")(not_blank)


class DocumentsRequest(BaseModel):
    documents: list[Document] = Field(..., min_length=1, description="Documents to index.")

    @field_validator("documents")
    @classmethod
    def _unique_ids(cls, documents: list[Document]) -> list[Document]:
        seen: set[str] = set()
        for doc in documents:
            if doc.id in seen:
                raise ValueError(f"id {doc.id!r} appears more than once")
            seen.add(doc.id)
        return documents


class DocumentsResponse(BaseModel):
    indexed: int = Field(..., description="Documents indexed.")
    chunks: int = Field(..., description="Chunks written for them.")


class DocumentsDelete(BaseModel):
    """Which documents a bulk delete removes: those whose id starts with ``prefix`` and whose metadata holds
    every field of ``filter`` (both must hold when both are given). One of them is required."""

    prefix: str | None = Field(
        None, min_length=1, max_length=512, description="Delete the documents whose id starts with this."
    )
    filter: Filters | None = Field(
        None, min_length=1, description="Delete the documents whose metadata fields equal these values."
    )

    def selector_missing(self) -> str | None:
        """Why the request selects nothing, so that it would take every document; None when it selects."""
        if self.prefix is None and self.filter is None:
            return "prefix: give prefix or filter (or both); a bulk delete never deletes every document"
        return None


class DocumentsDeleted(BaseModel):
    deleted: int = Field(..., description="Documents deleted, every chunk of each.")


class SearchRequest(BaseModel):
    query: NonBlankStr = Field(..., min_length=1)
    top_k: int = Field(5, ge=1, le=100)
    filters: Filters | None = Field(None, description="Metadata fields that must equal these values.")


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
