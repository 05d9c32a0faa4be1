"""Turns a question and its retrieved chunks into chat messages; the worker applies the model's template."""

from __future__ import annotations

from services.common.schemas import Source

# Plain on purpose: the packaged 135M model copes with this and loses the thread when asked to cite
# ([1] markers); a larger production model can be told to cite through RAG_SYSTEM_PROMPT.
SYSTEM = (
    "You are a helpful assistant. Answer the question in one or two sentences, using only the sources below. "
    "If the sources do not contain the answer, say that you do not know."
)


def build_messages(
    question: str, sources: list[Source], max_context_chars: int, system: str = SYSTEM
) -> list[dict[str, str]]:
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
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]
