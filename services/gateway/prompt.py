"""Turns a question and its retrieved chunks into chat messages; the worker applies the model's template."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from services.common.schemas import Source

# Plain on purpose: the packaged 135M model copes with this and loses the thread when asked to cite
# ([1] markers); a larger production model can be told to cite through RAG_SYSTEM_PROMPT.
SYSTEM = (
    "You are a helpful assistant. Answer the question in one short sentence, using only the sources below. "
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


@dataclass(frozen=True)
class Conversation:
    """What a chat adds to its last question: the caller's own system messages and the earlier turns."""

    system: Sequence[str] = ()
    turns: Sequence[tuple[Literal["user", "assistant"], str]] = ()  # oldest first, texts stripped, none empty
    history_chars: int = 0  # characters of earlier turns kept, newest first


def build_messages(
    question: str,
    sources: list[Source],
    max_context_chars: int,
    system: str = SYSTEM,
    conversation: Conversation | None = None,
    context: list[str] | None = None,
) -> list[dict[str, str]]:
    """Our system message (plus the caller's), the newest earlier turns that fit, then sources and question.

    ``context``: the text given for each source (``grounding.select_context``; empty for a source left out);
    without it, each source's text from its start, ``max_context_chars`` in all. A source is only its
    ``[n]`` and its text: labels such as the document id are what a small model copies into its answer."""
    texts = context if context is not None else context_texts(sources, max_context_chars)
    blocks = [f"[{number}] {text}" for number, text in enumerate(texts, start=1) if text]
    given = "\n\n".join(blocks) if blocks else "(no sources were found)"
    user = {"role": "user", "content": f"Sources:\n{given}\n\nQuestion: {question.strip()}"}
    if conversation is None:
        return [{"role": "system", "content": system}, user]
    system_message = {"role": "system", "content": "\n\n".join([system, *conversation.system])}
    return [system_message, *_history(conversation), user]


def _history(conversation: Conversation) -> list[dict[str, str]]:
    """The newest earlier turns within ``history_chars``, never starting with an answer whose question did not
    fit."""
    history: list[dict[str, str]] = []
    budget = conversation.history_chars
    for role, text in reversed(conversation.turns):
        if len(text) > budget:
            break
        budget -= len(text)
        history.append({"role": role, "content": text})
    history.reverse()
    while history and history[0]["role"] == "assistant":
        history.pop(0)
    return history
