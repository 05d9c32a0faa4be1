"""The allocator setting every model process makes: a model's batches stop faulting their memory in again;
and the heap every service freezes once started, so that full collections no longer walk it."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import subprocess
import sys
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.common import serve
from services.common.memory import freeze_heap, keep_freed_memory

ROOT = Path(__file__).resolve().parents[2]

# The real embedding model on a thread of its own, as the service's batcher runs it: page faults taken by
# that thread over five batches of 32 texts, after three to warm up.
SCRIPT = """
import resource, sys, threading
from services.common.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
from services.embedding.model import Embedder
embedder = Embedder("", "cpu")
texts = [f"kubernetes schedules pods on gpu nodes, number {i}, while the queue protects workers" for i in range(32)]
faults = []
def batches():
    for _ in range(3):
        embedder.encode(texts, 32)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(5):
        embedder.encode(texts, 32)
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=batches)
thread.start()
thread.join()
print(faults[0] / 5)
"""


def faults_per_batch(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's; elsewhere nothing is done")
def test_a_model_thread_takes_far_fewer_page_faults_per_batch_once_set() -> None:
    default, kept = faults_per_batch("default"), faults_per_batch("keep")
    # glibc 2.36 here: 2,400 to 4,400 faults per batch by default; kept, none in most runs, 250 at most seen.
    assert kept * 4 < default, f"{kept} page faults per batch with the freed memory kept, {default} without"


def test_an_allocator_setting_in_the_environment_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    assert keep_freed_memory() is False


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
