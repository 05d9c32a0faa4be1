"""Sentence attribution with the real embedding model, and the thresholds' checks at start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from ragpod.processes import free_port
from services.embedding.model import Embedder
from services.gateway.attribution import (
    attribute,
    attribute_to,
    embed_sources,
    facts_hold,
    markers,
    split_sentences,
)
from services.gateway.config import Settings
from services.gateway.pipeline import above_floor
from services.gateway.schemas import Source

KETTLE = (
    "The Orbital Kettle boils 1.7 litres of water in four minutes. It switches itself off 30 seconds after the "
    "water boils. The kettle comes with a warranty of two years."
)
TRAIL = "The Glacier Ridge Trail is 14 kilometres long. Dogs are not allowed on the trail."


class CountingEmbed:
    """The real model behind the gateway's embed call, counting calls and texts."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.calls: list[list[str]] = []

    async def __call__(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(texts)
        return self.embedder.encode(texts)


@pytest.fixture
def embed(embedder: Embedder) -> CountingEmbed:
    return CountingEmbed(embedder)


def test_sentences_are_cut_at_sentence_ends_and_lines_keeping_markers() -> None:
    text = (
        "KEDA scales the workers.[1] It adds one per five jobs [2]. E.g. this stays whole.\n- a bullet\n1. [1] 2. [2]"
    )
    assert split_sentences(text) == [
        "KEDA scales the workers.[1]",
        "It adds one per five jobs [2].",
        "E.g. this stays whole.",
        "- a bullet",
        "1. [1] 2. [2]",
    ]
    assert split_sentences("Sold in 1987. Then [3] more.") == ["Sold in 1987.", "Then [3] more."]
    assert split_sentences("  \n[1]\n") == []


def test_text_wrapped_at_a_fixed_width_is_read_as_paragraphs() -> None:
    wrapped = (
        "# Where each service runs\n\nThe retriever prefers nodes near Qdrant to keep search latency low, and never\n"
        "shares a node with an LLM pod, as the scheduling rules say. Qdrant runs as a\n"
        "StatefulSet on high-memory nodes.\nShort line\nNext line"
    )
    assert split_sentences(wrapped) == [
        "# Where each service runs",
        "The retriever prefers nodes near Qdrant to keep search latency low, and never shares a node with an LLM pod, "
        "as the scheduling rules say.",
        "Qdrant runs as a StatefulSet on high-memory nodes.",
        "Short line",
        "Next line",
    ]


def test_markers_are_read_in_order_once_each() -> None:
    assert markers("a [2] b [1, 3] c [2]") == [2, 1, 3]
    assert markers("no markers, [x] or [] here") == []


async def test_a_sentence_copied_from_a_source_is_supported_and_an_invented_one_is_not(embed: CountingEmbed) -> None:
    answer = "The kettle comes with a warranty of two years. The kettle was designed by a team in Milan in 1962."
    result = await attribute(answer, [TRAIL, KETTLE], embed, Settings().min_support)
    copied, invented = result.citations
    assert copied.sentence == "The kettle comes with a warranty of two years."
    assert copied.source == 2 and copied.support > 0.99
    assert invented.support < Settings().min_support
    assert result.grounded is False


async def test_a_paraphrase_is_supported_by_its_source_and_the_answer_is_grounded(embed: CountingEmbed) -> None:
    answer = (
        "The trail is fourteen kilometres long and dogs may not walk on it.\nThe kettle boils water in four minutes."
    )
    result = await attribute(answer, [TRAIL, KETTLE], embed, Settings().min_support)
    assert [c.source for c in result.citations] == [1, 2]
    assert all(c.support >= Settings().min_support for c in result.citations), result.citations
    assert result.grounded is True and result.warnings == []


async def test_each_distinct_sentence_is_embedded_once(embed: CountingEmbed) -> None:
    answer = "Dogs are not allowed on the trail. Dogs are not allowed on the trail [1]. Dogs like the kettle."
    await attribute(answer, [TRAIL, TRAIL + " It is steep.", KETTLE], embed, 0.5)
    sources, answers = embed.calls  # the sources' sentences, then the answer's not among them
    assert len(sources) == len(set(sources)) == 6
    assert "Dogs are not allowed on the trail." in sources and "It is steep." in sources
    assert answers == ["Dogs like the kettle."]


async def test_sources_embedded_ahead_serve_any_answer_without_embedding_them_again(embed: CountingEmbed) -> None:
    sources = await embed_sources([TRAIL, KETTLE], embed)
    assert [number for number, _ in sources.sentences] == [1, 1, 2, 2, 2] and len(embed.calls) == 1
    copied = await attribute_to("Dogs are not allowed on the trail [1].", sources, embed, 0.5)
    assert len(embed.calls) == 1 and copied.citations[0].support > 0.99 and copied.grounded
    paraphrase = await attribute_to("The kettle boils water in four minutes.", sources, embed, 0.5)
    assert embed.calls[1:] == [["The kettle boils water in four minutes."]]
    assert paraphrase.citations[0].source == 2


async def test_a_sentence_with_a_number_not_in_its_source_is_unsupported(embed: CountingEmbed) -> None:
    """Similar is not enough: a number the source does not hold fails the sentence, however close the rest."""
    sources = await embed_sources([TRAIL, KETTLE], embed)
    wrong = await attribute_to("The Orbital Kettle boils 1.7 litres of water in five minutes.", sources, embed, 0.5)
    assert wrong.citations[0].support > 0.9 and not wrong.grounded
    right = await attribute_to("The Orbital Kettle boils 1.7 litres in 4 minutes.", sources, embed, 0.5)
    assert right.grounded and right.citations[0].source == 2  # "4" is the source's "four"
    mixed = await attribute_to("The Glacier Ridge Trail is 1.7 kilometres long.", sources, embed, 0.5)
    assert not mixed.grounded  # 1.7 is in the other source, not the one the sentence is about


def test_facts_are_numbers_and_names_that_can_be_told_apart() -> None:
    source = "KEDA scales the LLM workers on the depth of the Redis queue, from one to eight workers, at 01:30."
    assert facts_hold("KEDA scales them on the queue depth.", source)
    assert facts_hold("Keda skaliert die Worker nach der Tiefe der Warteschlange, bis zu 8.", source)  # German
    assert facts_hold("It starts at 1:30.", source)
    assert not facts_hold("HPA scales them on the queue depth.", source)
    assert facts_hold("HPA scales them.", source, question="Does the HPA scale them?")
    assert not facts_hold("Up to 9 workers.", source)
    assert facts_hold("The answer cites [1].", source)  # a marker is no number


async def test_titles_are_not_sentences_of_a_source_and_times_of_day_do_not_end_one(embed: CountingEmbed) -> None:
    """A title names a subject without stating anything (it would support any question about that subject);
    "9 a.m." does not end a sentence."""
    library = "# Harbor Street Library\n\nThe library opens at 9 a.m. on weekdays and at 11 a.m. on Saturdays."
    sources = await embed_sources([library], embed, question="When does the library open?")
    assert [text for _, text in sources.sentences] == [
        "The library opens at 9 a.m. on weekdays and at 11 a.m. on Saturdays."
    ]
    assert embed.calls == [[sources.sentences[0][1], "When does the library open?"]]
    assert sources.question_support()[0] > 0.6


async def test_markers_that_disagree_with_the_sources_are_reported(embed: CountingEmbed) -> None:
    answer = (
        "The kettle comes with a warranty of two years [2]. "  # right
        "The trail is 14 kilometres long [2]. "  # names the kettle's source
        "Dogs are not allowed on the trail [7]."  # names no source
    )
    result = await attribute(answer, [TRAIL, KETTLE], embed, Settings().min_support)
    assert [c.source for c in result.citations] == [2, 1, 1]
    assert [(w.marker, w.source) for w in result.warnings] == [(2, 1), (7, 1)]
    wrong, missing = result.warnings
    assert wrong.sentence == "The trail is 14 kilometres long [2]." and wrong.support < Settings().min_support
    assert "best source is [1]" in wrong.detail
    assert "names no source" in missing.detail


async def test_nothing_is_embedded_without_an_answer_or_sources(embed: CountingEmbed) -> None:
    for answer, sources in (("", [KETTLE]), ("[1]", [KETTLE]), ("An answer.", [])):
        result = await attribute(answer, sources, embed, 0.5)
        assert result.citations == [] and result.grounded is False
    assert embed.calls == []


async def test_an_enumeration_of_markers_is_not_supported(embed: CountingEmbed) -> None:
    result = await attribute("1. [1] 2. [2] 3. [3] 4. [4]", [TRAIL, KETTLE], embed, 0.5)
    (citation,) = result.citations
    assert citation.support == 0.0 and result.grounded is False
    assert sorted(w.marker for w in result.warnings) == [1, 2, 3, 4]


def test_the_floor_keeps_sources_that_reach_it() -> None:
    hits = [
        Source(document_id=d, chunk=0, score=s, text="t", metadata={}) for d, s in (("a", 0.6), ("b", 0.25), ("c", 0.1))
    ]
    assert [s.document_id for s in above_floor(hits, 0.25)] == ["a", "b"]
    assert above_floor(hits, 0.7) == []


@pytest.mark.parametrize("name", ["RAG_MIN_RELEVANCE", "RAG_MIN_SUPPORT"])
@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_a_threshold_outside_0_to_1_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name):
        Settings()


def test_the_service_stops_at_start_on_a_bad_threshold() -> None:
    env = {**os.environ, "RAG_MIN_RELEVANCE": "2", "RAG_PORT": str(free_port())}
    done = subprocess.run(
        [sys.executable, "-m", "services.gateway"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode != 0
    assert "RAG_MIN_RELEVANCE must be between 0 and 1" in done.stderr
