"""Turns a question and its retrieved chunks into chat messages; the worker applies the model's template."""

from __future__ import annotations

from services.common.schemas import Source

SYSTEM = (
    "You are a helpful assistant. Answer the question using only the numbered sources. "
    "Cite the sources you use like [1]. If the sources do not contain the answer, say that you do not know."
)


def build_messages(question: str, sources: list[Source], max_context_chars: int) -> list[dict[str, str]]:
    blocks: list[str] = []
    used = 0
    for number, source in enumerate(sources, start=1):
        text = source.text[: max(max_context_chars - used, 0)]
        if not text:
            break
        blocks.append(f"[{number}] (source: {source.document_id}, chunk {source.chunk})\n{text}")
        used += len(text)
    context = "\n\n".join(blocks) if blocks else "(no sources were found)"
    user = f"Sources:\n{context}\n\nQuestion: {question.strip()}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
