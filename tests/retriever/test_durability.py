"""The embedded store under faults: a write is on disk before it returns, and a process killed at any point
leaves every document whole (one version, never chunks of two)."""

from __future__ import annotations

import asyncio
import contextvars
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import qdrant_edge as qe

from services.retriever.chunking import point_id
from services.retriever.store import ChunkPoint, EdgeStore, VectorStore
from services.retriever.text import Sparse

DIMENSION = 4
COLLECTION = "chunks"


def version(doc: str, tag: str, chunks: int) -> list[ChunkPoint]:
    """``chunks`` chunks of ``doc``, each text naming the version ``tag`` it belongs to."""
    return [
        ChunkPoint(
            point_id(doc, i),
            [1.0, float(i), 0.5, 0.25],
            Sparse([i + 1], [1.0]),
            {"document_id": doc, "chunk": i, "chunks": chunks, "text": f"{tag} chunk {i}", "metadata": {}},
        )
        for i in range(chunks)
    ]


WRITER: contextvars.ContextVar[str] = contextvars.ContextVar("writer", default="-")


class RecordingShard:
    """The real shard, with each update (named by the writer whose context it runs in: ``asyncio.to_thread``
    carries the context over) and each flush written down in ``log``."""

    def __init__(self, shard: qe.EdgeShard, log: list[str]) -> None:
        self._shard = shard
        self._log = log

    def update(self, operation: qe.UpdateOperation) -> None:
        self._shard.update(operation)
        self._log.append(f"update-{WRITER.get()}")

    def flush(self) -> None:
        self._log.append("flush-begins")
        self._shard.flush()
        self._log.append("flush-ends")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shard, name)


async def test_a_write_returns_only_after_a_flush_that_began_after_its_updates(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path, COLLECTION)
    await store.ensure_collection(DIMENSION)
    log: list[str] = []
    store._shard = RecordingShard(store._shard, log)  # type: ignore[arg-type,assignment]

    async def write(n: int) -> None:
        WRITER.set(str(n))
        await store.write(version(f"doc-{n}", "v1", 3), {f"doc-{n}": 3})
        log.append(f"returned-{n}")

    async def delete() -> None:
        WRITER.set("delete")
        assert await store.delete_document("doc-100")
        log.append("returned-delete")

    try:
        await write(100)  # alone: two updates, one flush, then the answer
        assert log == ["update-100", "update-100", "flush-begins", "flush-ends", "returned-100"]
        await asyncio.gather(*(write(n) for n in range(6)), delete())
    finally:
        await store.close()
    for writer in [*map(str, range(6)), "delete"]:
        returned = log.index(f"returned-{writer}")
        last_update = max(i for i, entry in enumerate(log) if entry == f"update-{writer}")
        covering = [
            i
            for i, entry in enumerate(log)
            if entry == "flush-begins" and last_update < i and log.index("flush-ends", i) < returned
        ]
        assert covering, (writer, log)
    assert log.count("flush-begins") <= 8  # at most one per write; writes that arrive during one share the next


STORE_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from tests.retriever.test_durability import COLLECTION, DIMENSION, version
    from services.retriever.store import EdgeStore

    async def main() -> None:
        store = EdgeStore(sys.argv[1], COLLECTION)
        await store.ensure_collection(DIMENSION)
        {body}

    asyncio.run(main())
    """
)


def run_store_script(path: Path, body: str) -> subprocess.CompletedProcess[str]:
    """Runs ``body`` in a process of its own against the store at ``path``; the body ends it as it likes."""
    script = STORE_SCRIPT.format(body=textwrap.indent(textwrap.dedent(body), " " * 4).strip())
    return subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )


async def test_a_document_acknowledged_right_before_kill_9_is_there_after_reopening(tmp_path: Path) -> None:
    done = run_store_script(
        tmp_path,
        """
        await store.write(version("acked", "v1", 3), {"acked": 3})
        print("acknowledged", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    assert done.returncode == -9 and "acknowledged" in done.stdout, done.stderr
    reopened = EdgeStore(tmp_path, COLLECTION)
    try:
        info = await reopened.get_document("acked")
        assert info is not None and info.chunks == 3
        assert await reopened.count() == 3
    finally:
        await reopened.close()


async def chunks_of(store: VectorStore, doc: str) -> list[str]:
    """Every stored chunk text of ``doc``, in chunk order, as a listing of all points sees them."""
    found: list[tuple[int, str]] = []
    offset: str | None = None
    while True:
        page, offset = await store.scroll(offset, 100)
        found += [(int(p["chunk"]), str(p["text"])) for _, p in page if p.get("document_id") == doc]
        if offset is None:
            return [text for _, text in sorted(found)]


@pytest.mark.parametrize("dies_at", [1, 2])
async def test_a_crash_inside_a_shorter_resend_leaves_one_version_whole(tmp_path: Path, dies_at: int) -> None:
    """The process is killed as it makes update ``dies_at`` of the re-send (1: the upsert, 2: the delete of
    the old tail, the upsert already in the write-ahead log); reopened, the document is one version."""
    done = run_store_script(
        tmp_path,
        f"""
        await store.write(version("manual", "v1", 6), {{"manual": 6}})
        shard, calls = store._shard, []

        class DiesAt:
            def update(self, operation):
                calls.append(operation)
                if len(calls) == {dies_at}:
                    os.kill(os.getpid(), signal.SIGKILL)
                shard.update(operation)

            def __getattr__(self, name):
                return getattr(shard, name)

        store._shard = DiesAt()
        await store.write(version("manual", "v2", 2), {{"manual": 2}})
        print("not killed", flush=True)
        """,
    )
    assert done.returncode == -9, done.stdout + done.stderr
    reopened = EdgeStore(tmp_path, COLLECTION)
    try:
        texts = await chunks_of(reopened, "manual")
        info = await reopened.get_document("manual")
        hits = await reopened.search([1.0, 0.0, 0.5, 0.25], None, 10, None, "dense")
    finally:
        await reopened.close()
    expected = [f"v1 chunk {i}" for i in range(6)] if dies_at == 1 else [f"v2 chunk {i}" for i in range(2)]
    assert texts == expected
    assert info is not None and info.chunks == len(expected)
    assert sorted(h.text for h in hits) == sorted(expected)


async def test_no_reader_sees_two_versions_while_a_shorter_resend_is_written(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path, COLLECTION)
    await store.ensure_collection(DIMENSION)
    await store.write(version("manual", "v1", 6), {"manual": 6})
    shard = store._shard

    class SlowBetweenUpdates:
        def update(self, operation: qe.UpdateOperation) -> None:
            shard.update(operation)  # type: ignore[union-attr]
            time.sleep(0.3)  # the gap between the upsert and the delete, widened

        def __getattr__(self, name: str) -> Any:
            return getattr(shard, name)

    store._shard = SlowBetweenUpdates()  # type: ignore[assignment]
    seen: list[set[str]] = []
    writing = asyncio.create_task(store.write(version("manual", "v2", 2), {"manual": 2}))
    try:
        while not writing.done():
            hits = await store.search([1.0, 0.0, 0.5, 0.25], None, 10, None, "dense")
            seen.append({h.text.split()[0] for h in hits})
            await asyncio.sleep(0.02)
        await writing
    finally:
        store._shard = shard
        await store.close()
    assert seen and all(len(versions) == 1 for versions in seen), seen
