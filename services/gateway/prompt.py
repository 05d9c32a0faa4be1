"""Turns a question and its retrieved chunks into chat messages; the worker applies the model's template."""

from __future__ import annotations

from services.common.schemas import Source

# Plain on purpose: the packaged 135M model copes with this and loses the thread when asked to cite
# ([1] markers); a larger production model can be told to cite through RAG_SYSTEM_PROMPT.
SYSTEM = (
    "You are a helpful assistant. Answer the question in one or two sentences, using only the sources below. "
    "If the sources do not contain the answer, say that you do not know."
)


def context_texts(sources: list[Source], max_context_chars: int) -> list[str]:
    """The text of each source as the prompt carries it: ``max_context_chars`` in all, sources in order."""
    texts: list[str] = []
    used = 0
    for source in sources:
        text = source.text[: max(max_context_chars - used, 0)]
        if not text:
            break
        texts.append(text)
        used += len(text)
    return texts


def build_messages(
    question: str, sources: list[Source], max_context_chars: int, system: str = SYSTEM
) -> list[dict[str, str]]:
    blocks = [
        f"[{number}] (source: {source.document_id}, chunk {source.chunk})\n{text}"
        for number, (source, text) in enumerate(
            zip(sources, context_texts(sources, max_context_chars), strict=False), start=1
        )
    ]
    context = "\n\n".join(blocks) if blocks else "(no sources were found)"
    user = f"Sources:\n{context}\n\nQuestion: {question.strip()}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]
