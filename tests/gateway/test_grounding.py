"""The sentences given to the model, the answer's last clean-up, and the quote given in its place."""

from __future__ import annotations

import math

from services.gateway.attribution import SourceSentences
from services.gateway.grounding import clean_answer, extract, select_context


def test_a_looping_generation_is_cut_where_it_starts_to_repeat() -> None:
    looping = "KEDA scales the workers on the queue depth. The queue depth of the queue depth of the queue depth of the"
    cleaned = clean_answer(looping, cut_off=True)
    assert cleaned.looped
    assert cleaned.text == "KEDA scales the workers on the queue depth."


def test_a_sentence_said_again_is_dropped() -> None:
    cleaned = clean_answer("Four pods share one GPU. Four  pods share one GPU! It is time-sliced.")
    assert cleaned.text == "Four pods share one GPU. It is time-sliced."
    assert not cleaned.looped
    assert clean_answer("Four pods share one GPU. " * 3).looped  # a third time is a loop


def test_strung_markers_are_a_loop() -> None:
    cleaned = clean_answer("MIG splits the GPU. [1] [2] [3] [4] [5] [6] [7] [8]")
    assert cleaned.looped and cleaned.text == "MIG splits the GPU."


def test_echoed_prompt_markup_is_removed() -> None:
    echoed = "[1] (source: gpu-sharing.md, chunk 0) # Sharing GPUs\nThe LLM server gets a whole GPU."
    assert clean_answer(echoed).text == "[1] Sharing GPUs The LLM server gets a whole GPU."
    assert clean_answer("Answer: Four pods.\nQuestion: How many pods?\nSources: [1]").text == "Four pods."


def test_an_unfinished_last_sentence_is_dropped_only_when_the_model_ran_out_of_tokens() -> None:
    assert clean_answer("Four pods share a GPU. The other", cut_off=True).text == "Four pods share a GPU."
    assert clean_answer("Four pods share a GPU. The other").text == "Four pods share a GPU. The other"


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def sentences(texts: list[tuple[int, str, float]], count: int) -> SourceSentences:
    """Sources whose sentences lie at the given angles (radians) from the question, on a circle."""
    return SourceSentences(
        count=count,
        sentences=[(number, text) for number, text, _ in texts],
        vectors={text: unit(angle) for _, text, angle in texts},
        texts=[],
        question=unit(0.0),
    )


SOURCES = sentences(
    [
        (1, "A far one.", 1.4),
        (1, "Before the best.", 1.3),
        (1, "The best one.", 0.1),
        (1, "After the best.", 1.5),
        (1, "Another far one.", 1.45),
        (2, "The second best.", 0.3),
        (2, "The best one.", 0.1),  # the same sentence in an overlapping chunk
        (2, "A third.", 1.2),
    ],
    count=3,
)


def test_the_best_sentences_with_their_neighbours_in_their_order_within_the_budget() -> None:
    assert select_context(SOURCES, 64) == ["Before the best. The best one. After the best.", "The second best.", ""]
    assert select_context(SOURCES, 14) == ["The best one.", "", ""]
    assert select_context(SourceSentences(1, [(1, "x.")], {"x.": [1.0, 0.0]}), 100) is None  # no question
    assert select_context(SourceSentences(1, [], {"?": [1.0, 0.0]}, ["# A title"], [1.0, 0.0]), 100) is None


def test_the_quote_is_the_best_sentence_with_its_number_or_none_below_the_threshold() -> None:
    assert extract(SOURCES, min_question_support=0.9) == '"The best one." [1]'
    close = sentences([(1, "Best.", 0.1), (1, "Far.", 1.5), (1, "Close.", 0.2)], count=1)
    assert extract(close, min_question_support=0.9) == '"Best. Close." [1]'
    assert extract(SOURCES, min_question_support=0.999) is None
