"""The heap a process freezes once, when its start is done: what was alive then is left out of later
collections, and the entry point decides where the one freeze comes."""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI

from services.common import serve
from services.common.memory import freeze_heap
from services.common.settings import ServiceSettings


class Node:
    other: Any = None


def dropped_cycle() -> weakref.ref[Node]:
    """Two objects that refer to each other and to nothing else: garbage only the collector frees."""
    first, second = Node(), Node()
    first.other, second.other = second, first
    return weakref.ref(first)


def test_a_frozen_heap_is_left_out_of_collections_and_what_comes_later_is_collected() -> None:
    kept = Node()
    kept.other = kept  # a cycle alive at the freeze, dropped after it
    frozen = weakref.ref(kept)
    try:
        assert freeze_heap() > 0
        del kept
        later = dropped_cycle()
        gc.collect()
        assert later() is None  # made after the freeze: collected as before
        assert frozen() is not None  # frozen: no collection looks at it any more
    finally:
        gc.unfreeze()
    gc.collect()
    assert frozen() is None


async def test_the_entry_point_freezes_the_heap_once_the_app_has_started(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []

    def freeze() -> int:
        events.append("frozen")
        return 1

    monkeypatch.setattr(serve, "freeze_heap", freeze)

    @contextlib.asynccontextmanager
    async def lifespan(_: object) -> AsyncIterator[dict[str, int]]:
        events.append("started")
        yield {"state": 1}
        events.append("stopped")

    async with serve.frozen_once_started(lifespan)(object()) as state:
        assert state == {"state": 1}
        assert events == ["started", "frozen"]
    assert events == ["started", "frozen", "stopped"]


@pytest.mark.parametrize("freeze_when_started", [True, False])
async def test_the_entry_point_freezes_on_startup_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, freeze_when_started: bool
) -> None:
    """An app that freezes its heap itself later (the embedding service, once its model has loaded) is served
    with ``freeze_when_started=False``: its startup then freezes nothing, so the process freezes once."""
    events: list[str] = []
    served: list[FastAPI] = []

    def freeze() -> int:
        events.append("frozen")
        return 1

    monkeypatch.setattr(serve, "freeze_heap", freeze)
    monkeypatch.setattr(serve, "configure_logging", lambda *_: None)
    monkeypatch.setattr(serve.uvicorn, "run", lambda app, **_: served.append(app))
    serve.run("test", ServiceSettings(port=8000), FastAPI, freeze_when_started=freeze_when_started)
    async with served[0].router.lifespan_context(served[0]):
        events.append("serving")
    assert events == (["frozen", "serving"] if freeze_when_started else ["serving"])
