"""Which source supports each sentence of an answer.

The sources an answer is written from are cut into sentences and embedded in
one batched call, which the gateway makes as soon as the job is queued, so that
it runs while the answer is generated (``embed_sources``). Once the answer is
there, its sentences not already among the sources' are embedded in one more
call, and each is attributed to the source holding its most similar sentence
(cosine similarity, the ``support``). A sentence passes the check when its support reaches
``RAG_MIN_SUPPORT`` and what can be checked without understanding holds in the source it is
attributed to (``facts_hold``: its numbers, and names written as acronyms or in CamelCase);
an answer is grounded when every sentence passes. ``[n]`` markers the model wrote are compared
with that: a marker naming no source, or a source that does not support the sentence (support
below the threshold), is reported in ``citation_warnings``.

The question can be embedded in the same call as the sources' sentences (``embed_sources``), so
that the sentences that answer it can be chosen for the prompt (``services.gateway.grounding``)
without another call.

Plain Python on purpose: the gateway carries no numpy or torch, and a few
hundred 384-dimensional dot products take well under a millisecond.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from services.gateway.schemas import Citation, CitationWarning

Embed = Callable[[list[str]], Awaitable[list[list[float]]]]

_MARKER = re.compile(r"\[\s*(\d+(?:\s*[,;]\s*\d+)*)\s*\]")
_LEADING_MARKERS = re.compile(r"^(?:\s*\[\s*\d+(?:\s*[,;]\s*\d+)*\s*\])+")
# A sentence ends at . ! ? (then closing quotes or brackets, then [n] markers) followed by white space.
_END = re.compile(r"[.!?]+[\"'”’)]*(?:\s*\[\s*\d+(?:\s*[,;]\s*\d+)*\s*\])*\s+")
_ABBREVIATION = re.compile(
    r"(?:^|[\s(])(?:e\.g|i\.e|a\.m|p\.m|etc|vs|cf|dr|mr|mrs|ms|fig|approx|[a-z])$", re.IGNORECASE
)
# Only enumerators (and markers) so far: "1." or "1. [1] 2." does not end a sentence.
_ENUMERATION = re.compile(r"^(?:\s*(?:\d{1,3}[.)]|\[\s*\d+(?:\s*[,;]\s*\d+)*\s*\]))*\s*\d{1,3}$")
_LIST_PREFIX = re.compile(r"^\s*(?:#{1,6}\s+|[-*•]\s+|>\s*)")
_SPACE_BEFORE_STOP = re.compile(r"\s+([.,;:!?])")
_BLOCK_START = re.compile(r"^\s*(?:#{1,6}\s|[-*•>]\s|\d{1,3}[.)]\s|\[\d+\]\s*\()")


def _paragraph_lines(text: str) -> list[str]:
    """Lines joined into paragraphs where text was wrapped at a fixed width: a line continues the one before
    when that one was long (60 characters or more) or it starts in lower case; blank lines, headings and list
    items always start anew."""
    lines: list[str] = []
    previous = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            previous = ""
            continue
        wrapped = len(previous) >= 60 or (bool(previous) and stripped[0].islower())
        if wrapped and not previous.startswith("#") and not _BLOCK_START.match(line):
            lines[-1] = f"{lines[-1]} {stripped}"
        else:
            lines.append(stripped)
        previous = stripped
    return lines


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: cut at paragraph breaks and sentence ends, markers kept with their sentence.

    An enumerator ("1."), an initial ("J.") or a common abbreviation does not end a
    sentence; ``[n]`` markers written just after a full stop belong to the sentence
    before them.
    """
    sentences: list[str] = []
    for line in _paragraph_lines(text):
        start = 0
        for match in _END.finditer(line):
            core = line[start : match.start()]
            if _ABBREVIATION.search(core) or _ENUMERATION.match(core):
                continue
            sentences.append(line[start : match.end()].strip())
            start = match.end()
        sentences.append(line[start:].strip())
    merged: list[str] = []
    for sentence in sentences:
        lead = _LEADING_MARKERS.match(sentence)
        if lead and merged:
            merged[-1] = f"{merged[-1]} {lead.group(0).strip()}"
            sentence = sentence[lead.end() :].strip()
        if sentence:
            merged.append(sentence)
    return [s for s in merged if any(ch.isalnum() for ch in _MARKER.sub("", s))]


def markers(sentence: str) -> list[int]:
    """The source numbers of the ``[n]`` / ``[n, m]`` markers in ``sentence``, in order, once each."""
    found: list[int] = []
    for match in _MARKER.finditer(sentence):
        for part in re.split(r"[,;]", match.group(1)):
            number = int(part)
            if number not in found:
                found.append(number)
    return found


def embedding_text(sentence: str) -> str:
    """What is embedded for a sentence: without markers, bullets or heading marks ("trail [1]." reads
    "trail.", the same text as the source's sentence)."""
    return _SPACE_BEFORE_STOP.sub(r"\1", _LIST_PREFIX.sub("", _MARKER.sub("", sentence))).strip()


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


@dataclass
class Attribution:
    citations: list[Citation] = field(default_factory=list)
    grounded: bool = False
    warnings: list[CitationWarning] = field(default_factory=list)


@dataclass
class SourceSentences:
    """The sentences of the sources an answer is written from, with their vectors."""

    count: int  # how many sources: citations number them 1..count
    sentences: list[tuple[int, str]]  # (source number, text as embedded)
    vectors: dict[str, list[float]]  # one per distinct text
    texts: list[str] = field(default_factory=list)  # the sources' texts, in order (what facts are checked against)
    question: list[float] | None = None  # the question's vector, when it was embedded with them

    def question_support(self) -> list[float]:
        """The similarity of each of ``sentences`` to the question (empty when the question was not embedded)."""
        if self.question is None:
            return []
        return [_cosine(self.question, self.vectors[text]) for _, text in self.sentences]


async def embed_sources(sources: Sequence[str], embed: Embed, question: str | None = None) -> SourceSentences:
    """The sentences of ``sources`` (texts as the model saw them, in order), each distinct one embedded once,
    and the question if given, in one call; no call when there is nothing to embed."""
    sentences = [
        (number, text)
        for number, source in enumerate(sources, start=1)
        for text in (embedding_text(s) for s in split_sentences(source) if not _HEADING.match(s))
        if text
    ]
    asked = [question] if question and question.strip() else []
    vectors = await _embed_distinct([t for _, t in sentences] + asked, {}, embed)
    return SourceSentences(len(sources), sentences, vectors, list(sources), vectors[asked[0]] if asked else None)


_HEADING = re.compile(r"^\s*#{1,6}\s")  # a title names a subject and states nothing: no support, never quoted
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
# Names that can be told apart in any language: acronyms (KEDA, H100) and CamelCase (PostgreSQL, vLLM).
_NAME = re.compile(r"\b(?:[A-Z]{2,}[A-Za-z0-9]*|[A-Za-z][a-z]+[A-Z][A-Za-z0-9]*)\b")
# "one" is left out: as often a pronoun ("the one that") as a number.
_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        (
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ),
        start=2,
    )
}


def _numbers(text: str) -> set[tuple[int, ...]]:
    """The numbers in ``text`` ("01:30" and "1:30", "1,000" and "1.000" alike), English number words included."""
    words = re.sub(r"[A-Za-z]+", lambda m: _NUMBER_WORDS.get(m.group(0).lower(), m.group(0)), text)
    return {tuple(int(part) for part in re.split(r"[.,:]", found)) for found in _NUMBER.findall(words)}


def facts_hold(sentence: str, source: str, question: str = "") -> bool:
    """What can be checked without understanding: every number of ``sentence`` is in ``source`` (written in
    digits or as an English number word), and every name written as an acronym or in CamelCase is in the
    source or the question. Other words are left to the similarity, so a paraphrase or another language
    is not punished."""
    text = embedding_text(sentence)
    if not _numbers(text) <= _numbers(source):
        return False
    known = f"{source} {question}".lower()
    return all(name.lower() in known for name in _NAME.findall(text))


async def _embed_distinct(texts: Sequence[str], known: dict[str, list[float]], embed: Embed) -> dict[str, list[float]]:
    """Vectors of ``texts`` not in ``known``, each distinct text once, in one call (none when there is none)."""
    wanted = list(dict.fromkeys(t for t in texts if t and t not in known))
    if not wanted:
        return {}
    vectors = await embed(wanted)
    if len(vectors) != len(wanted):
        raise ValueError(f"embedding returned {len(vectors)} vectors for {len(wanted)} texts")
    return dict(zip(wanted, vectors, strict=True))


async def attribute(answer: str, sources: Sequence[str], embed: Embed, min_support: float) -> Attribution:
    """Attribute each sentence of ``answer`` to one of ``sources`` (texts as the model saw them, in order):
    ``embed_sources`` then ``attribute_to``; nothing is embedded when the answer has no sentence."""
    if not split_sentences(answer):
        return Attribution()
    return await attribute_to(answer, await embed_sources(sources, embed), embed, min_support)


async def attribute_to(
    answer: str, sources: SourceSentences, embed: Embed, min_support: float, question: str = ""
) -> Attribution:
    """Attribute each sentence of ``answer`` to one of the sources ``embed_sources`` read: the most similar one
    among those its facts hold in (``facts_hold``), else the most similar one, and the sentence fails.

    ``embed`` is called at most once, with the answer's distinct sentences that
    are not already among the sources'; not at all when the answer has no
    sentence or the sources none.
    """
    answer_sentences = split_sentences(answer)
    if not answer_sentences or not sources.sentences:
        return Attribution()
    vectors = {**sources.vectors}
    vectors.update(await _embed_distinct([embedding_text(s) for s in answer_sentences], vectors, embed))

    citations: list[Citation] = []
    warnings: list[CitationWarning] = []
    passed: list[bool] = []
    for sentence in answer_sentences:
        text = embedding_text(sentence)
        # Per source, the best similarity of this sentence to one of its sentences.
        per_source = [0.0] * sources.count
        if text and any(ch.isalpha() for ch in text):
            vector = vectors[text]
            for number, source_text in sources.sentences:
                similarity = _cosine(vector, vectors[source_text])
                per_source[number - 1] = max(per_source[number - 1], similarity)
        holding = [
            i for i in range(sources.count) if not sources.texts or facts_hold(sentence, sources.texts[i], question)
        ]
        best = max(holding or range(sources.count), key=lambda i: per_source[i])
        support = round(max(per_source[best], 0.0), 4)
        citations.append(Citation(sentence=sentence, source=best + 1, support=support))
        passed.append(bool(holding) and support >= min_support)
        for marker in markers(sentence):
            if not 1 <= marker <= sources.count:
                detail = f"[{marker}] names no source: the answer had {sources.count}"
                warnings.append(
                    CitationWarning(sentence=sentence, marker=marker, source=best + 1, support=0.0, detail=detail)
                )
            elif per_source[marker - 1] < min_support:
                marked = round(max(per_source[marker - 1], 0.0), 4)
                detail = f"source [{marker}] does not support this sentence (support {marked:.2f})"
                if marker != best + 1:
                    detail += f"; the best source is [{best + 1}] (support {support:.2f})"
                warnings.append(
                    CitationWarning(sentence=sentence, marker=marker, source=best + 1, support=marked, detail=detail)
                )
    grounded = all(passed)
    return Attribution(citations=citations, grounded=grounded, warnings=warnings)
