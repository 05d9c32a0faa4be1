"""Splits a document into overlapping chunks at natural boundaries."""

from __future__ import annotations

import uuid

from services.common.tenants import DEFAULT_TENANT

# Fixed namespace: the same (document, chunk) always maps to the same point id.
POINT_NAMESPACE = uuid.UUID("6f0e3f5a-9a1c-4f3e-8a53-2b7d0c1e4a11")
TENANT_NAMESPACE = uuid.uuid5(POINT_NAMESPACE, "tenants")
_BREAKS = ("\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ")


def point_id(document_id: str, chunk: int, tenant: str = DEFAULT_TENANT) -> str:
    """The chunk's point id: the default tenant's are those of the stores written before tenants existed (so
    sending such a document again replaces it); another tenant's derive from its name too, in a namespace
    of their own, so the same document id in two tenants is two documents."""
    if tenant == DEFAULT_TENANT:
        return str(uuid.uuid5(POINT_NAMESPACE, f"{document_id}\x00{chunk}"))
    return str(uuid.uuid5(TENANT_NAMESPACE, f"{tenant}\x00{document_id}\x00{chunk}"))


def _cut(text: str, start: int, hard_end: int, min_end: int) -> int:
    """The best place to end a chunk in ``text[min_end:hard_end]``: after a paragraph, sentence or word."""
    for mark in _BREAKS:
        at = text.rfind(mark, min_end, hard_end)
        if at != -1:
            return at + len(mark)
    return hard_end


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Chunks of at most ``size`` characters; each starts ``overlap`` characters before the last ended."""
    text = text.strip()
    if len(text) <= size:
        return [text] if text else []
    chunks: list[str] = []
    start = 0
    while start < len(text):
        hard_end = min(start + size, len(text))
        end = hard_end if hard_end == len(text) else _cut(text, start, hard_end, start + size // 2)
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        if end >= len(text):
            break
        # Step back by the overlap, then forward to a word start so no chunk begins mid-word.
        next_start = max(end - overlap, start + 1)
        space = text.find(" ", next_start, end)
        start = space + 1 if space != -1 else next_start
    return chunks
