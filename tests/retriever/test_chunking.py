from __future__ import annotations

import pytest

from services.retriever.chunking import chunk_text, point_id

TEXT = " ".join(f"Sentence number {i} says something about topic {i % 7}." for i in range(200))


def test_short_text_is_one_chunk() -> None:
    assert chunk_text("  just a little text  ", 800, 160) == ["just a little text"]


def test_chunks_respect_size_and_cover_the_text() -> None:
    chunks = chunk_text(TEXT, 400, 80)
    assert len(chunks) > 5
    assert all(len(c) <= 400 for c in chunks)
    # Every sentence survives somewhere.
    for i in range(200):
        assert any(f"Sentence number {i} says" in c for c in chunks), i


def test_neighbouring_chunks_overlap() -> None:
    chunks = chunk_text(TEXT, 400, 80)
    for left, right in zip(chunks, chunks[1:], strict=False):
        tail = left[-40:]
        assert tail.split(" ", 1)[-1] in right  # the end of one chunk starts the next


def test_chunks_break_at_sentence_ends_when_they_can() -> None:
    chunks = chunk_text(TEXT, 400, 0)
    assert all(c.endswith(".") for c in chunks[:-1])


def test_no_chunk_starts_mid_word() -> None:
    words = set(TEXT.split())
    for chunk in chunk_text(TEXT, 300, 70):
        assert chunk.split()[0] in words


def test_a_text_without_spaces_is_still_cut() -> None:
    chunks = chunk_text("x" * 2500, 1000, 100)
    assert [len(c) for c in chunks] == [1000, 1000, 700]


@pytest.mark.parametrize("text", ["", "   \n "])
def test_blank_text_has_no_chunks(text: str) -> None:
    assert chunk_text(text, 800, 160) == []


def test_point_ids_are_deterministic_and_distinct() -> None:
    assert point_id("doc-1", 0) == point_id("doc-1", 0)
    assert point_id("doc-1", 0) != point_id("doc-1", 1)
    assert point_id("doc-1", 1) != point_id("doc-11", 0)
    assert len({point_id("a", i) for i in range(100)}) == 100
