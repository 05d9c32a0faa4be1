"""What reaches the model and what is done with its text: the sentences that answer the question, a last
clean-up of the answer, and the quoted answer given when the model's does not pass the check.

All three read the sources' sentences as ``attribution.embed_sources`` embedded them, together with the
question, in the one call made before the job is queued:

- ``select_context``: the sources' sentences most similar to the question, each with its neighbours, in
  their own order, within a budget in characters (``RAG_MAX_CONTEXT_CHARS``);
- ``clean_answer``: the answer without prompt markup the model echoed, without a sentence said twice,
  and cut where it starts to loop;
- ``extract``: the best sentence or two of the source most similar to the question, quoted with its
  ``[n]``, or None when no sentence reaches ``RAG_MIN_QUESTION_SUPPORT`` (the question is then answered
  as not covered).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.gateway.attribution import SourceSentences, split_sentences


def select_context(sources: SourceSentences, budget: int) -> list[str] | None:
    """The text given to the model for each source (empty for a source none of whose sentences was chosen):
    the sentences most similar to the question first, the two best with their neighbours, until ``budget``
    characters are used; each source's sentences in their own order, a sentence that two overlapping chunks
    share only once. None when there is nothing to rank (the question was not embedded, or the sources have
    no sentence): the prompt then carries each source from its start."""
    support = sources.question_support()
    if not support:
        return None
    chosen: set[int] = set()
    seen: set[str] = set()
    used = 0

    def take(index: int) -> None:
        nonlocal used
        text = sources.sentences[index][1]
        if index in chosen or text in seen or used + len(text) > budget:
            return
        chosen.add(index)
        seen.add(text)
        used += len(text) + 1

    ranked = sorted(range(len(support)), key=lambda i: -support[i])
    leaders = 0
    for index in ranked:
        if sources.sentences[index][1] in seen:  # the same sentence in an overlapping chunk
            continue
        take(index)
        leaders += 1
        if leaders <= 2:  # the best two carry their neighbours: "It switches itself off" needs "The kettle"
            for neighbour in (index - 1, index + 1):
                if 0 <= neighbour < len(support) and sources.sentences[neighbour][0] == sources.sentences[index][0]:
                    take(neighbour)
    return [
        " ".join(text for i, (n, text) in enumerate(sources.sentences) if n == number and i in chosen)
        for number in range(1, sources.count + 1)
    ]


# What the prompt holds and an answer must not: source labels, section labels, heading marks.
_SOURCE_LABEL = re.compile(r"\(\s*source:[^)]*\)", re.IGNORECASE)
_SECTION = re.compile(r"^\s*(?:sources?|context|question|answer)\s*:\s*", re.IGNORECASE | re.MULTILINE)
_ECHO = re.compile(r"\n\s*(?:sources?|context|question)\s*:", re.IGNORECASE)
_HEADING = re.compile(r"(^|\s)#{1,6}\s+", re.MULTILINE)
_MARKER_RUN = re.compile(r"(?:\[\s*\d+\s*\]\s*[,;]?\s*){3,}")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Cleaned:
    text: str
    looped: bool  # the model repeated itself within a sentence or strung markers together: the text was cut


def clean_answer(answer: str, cut_off: bool = False) -> Cleaned:
    """The answer as it may be shown: echoed prompt markup removed, a sentence said a second time dropped, the
    text cut where a run of four words comes back a third time or ``[n]`` markers are strung together, and,
    when the model ran out of tokens (``cut_off``), the unfinished last sentence dropped."""
    text = answer
    echo = _ECHO.search(text)
    if echo:  # the model went on to write the prompt's next section: the answer ended before it
        text = text[: echo.start()]
    text = _HEADING.sub(r"\1", _SECTION.sub("", _SOURCE_LABEL.sub("", text)))
    text = re.sub(r"[ \t]+", " ", text)
    looped = False
    run = _MARKER_RUN.search(text)
    if run:
        text, looped = text[: run.start()], True
    loop_start = _loop_start(text)
    if loop_start is not None:
        text, looped = text[:loop_start], True
    sentences: list[str] = []
    seen: set[str] = set()
    for sentence in split_sentences(text):
        key = " ".join(_WORD.findall(sentence.lower()))
        if key and key not in seen:
            seen.add(key)
            sentences.append(sentence)
    if (cut_off or looped) and len(sentences) > 1 and not re.search(r"[.!?][\"'”’)\]]*$", sentences[-1]):
        sentences.pop()
    return Cleaned(" ".join(sentences).strip(), looped)


def _loop_start(text: str) -> int | None:
    """Where the text starts repeating itself: the second time a run of four words appears that appears three
    times in all; None when none does."""
    words = list(_WORD.finditer(text.lower()))
    runs: dict[tuple[str, ...], list[int]] = {}
    for i in range(len(words) - 3):
        runs.setdefault(tuple(w.group(0) for w in words[i : i + 4]), []).append(i)
    looping = [starts for starts in runs.values() if len(starts) >= 3]
    if not looping:
        return None
    return min(words[starts[1]].start() for starts in looping)


def extract(sources: SourceSentences, min_question_support: float) -> str | None:
    """The best sentence of the sources for the question, with the next best of the same source when it is
    nearly as good, quoted with the source's ``[n]``; None when no sentence reaches ``min_question_support``."""
    support = sources.question_support()
    if not support:
        return None
    best = max(range(len(support)), key=lambda i: support[i])
    if support[best] < min_question_support:
        return None
    number = sources.sentences[best][0]
    second = max(
        (
            i
            for i, (n, text) in enumerate(sources.sentences)
            if n == number and i != best and text != sources.sentences[best][1]
        ),
        key=lambda i: support[i],
        default=None,
    )
    chosen = [best]
    if second is not None and support[second] >= max(min_question_support, support[best] - 0.1):
        chosen.append(second)
    quoted = " ".join(sources.sentences[i][1] for i in sorted(chosen))
    return f'"{quoted}" [{number}]'
