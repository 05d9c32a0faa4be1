"""What gets embedded and keyword-indexed for a chunk: its document's header, then the chunk.

The header (the document's title and id) gives a chunk the context a reader
gets from the page it sits on: a chunk that only says "it restarts the pod"
is found by a question about the document it belongs to. The text returned as
a source stays the chunk itself.

Keyword vectors are BM25 term frequencies of stemmed words (Snowball, English
stop words dropped), hashed to sparse indices by Qdrant Edge's own BM25
model; the inverse document frequency is applied by Qdrant at search time
(``modifier=IDF``), so both backends score them the same way. Identifiers
written in camelCase or PascalCase also count as their words
(``JSONRenderer`` as json and renderer too), in documents and queries alike,
so technical text is found by the words a person types.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qdrant_edge import Bm25, Bm25Config

TITLE_MAX_CHARS = 160
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_WORD_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z0-9]+|[A-Z][A-Z0-9]*")


@dataclass(frozen=True, slots=True)
class Sparse:
    indices: list[int]
    values: list[float]


def document_title(document_id: str, text: str, metadata: Mapping[str, Any]) -> str:
    """Metadata ``title``, else the first Markdown heading, else the first non-blank line."""
    title = metadata.get("title")
    if isinstance(title, str) and title.strip():
        return _clip(title)
    first_line = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            heading = stripped.lstrip("#").strip()
            if heading:
                return _clip(heading)
        if not first_line:
            first_line = stripped
    return _clip(first_line or document_id)


def header(document_id: str, title: str) -> str:
    return title if title == document_id else f"{title} ({document_id})"


def indexed_text(head: str, chunk: str) -> str:
    """The text that is embedded and keyword-indexed for one chunk."""
    return f"{head}\n\n{chunk}"


def _clip(value: str) -> str:
    value = " ".join(value.split())
    return value if len(value) <= TITLE_MAX_CHARS else value[: TITLE_MAX_CHARS - 1].rstrip() + "…"


class KeywordEncoder:
    """BM25-style sparse vectors: one model for documents and queries, the same on every backend."""

    def __init__(self, chunk_size: int) -> None:
        # Expected document length in tokens: roughly one kept word per eight characters of chunk.
        self._model = Bm25(Bm25Config(avg_len=max(chunk_size / 8, 16.0)))

    def document(self, text: str) -> Sparse:
        vector = self._model.embed_document(with_word_parts(text))
        return Sparse(list(vector.indices), list(vector.values))

    def query(self, text: str) -> Sparse:
        vector = self._model.embed_query(with_word_parts(text))
        return Sparse(list(vector.indices), list(vector.values))


def with_word_parts(text: str) -> str:
    """The text, followed by the words inside its camelCase and PascalCase identifiers."""
    parts: list[str] = []
    for identifier in _IDENTIFIER.findall(text):
        words = _WORD_PART.findall(identifier)
        if len(words) > 1:
            parts.extend(words)
    return f"{text}\n{' '.join(parts)}" if parts else text
