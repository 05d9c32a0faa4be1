"""The embedded store under faults: a write is on disk before it returns, and a process killed at any point
leaves every document whole (one version, never chunks of two)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from services.retriever.chunking import point_id
from services.retriever.store import ChunkPoint, EdgeStore
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


class RecordingShard:
    """The real shard, with each update and flush written down in ``log`` as it begins and ends."""

    def __init__(self, shard: qe.EdgeShard, log: list[str]) -> None:
        self._shard = shard
        self._log = log

    def update(self, operation: qe.UpdateOperation) -> None:
        self._shard.update(operation)
        self._log.append("update")

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
        await store.write(version(f"doc-{n}", "v1", 3), {f"doc-{n}": 3})
        log.append(f"returned-{n}")

    try:
        await asyncio.gather(*(write(n) for n in range(6)))
        await store.delete_document("doc-0")
        log.append("deleted")
    finally:
        await store.close()
    for n in [*range(6), "deleted"]:
        end = log.index(f"returned-{n}" if n != "deleted" else "deleted")
        before = log[:end]
        last_flush_end = len(before) - 1 - before[::-1].index("flush-ends")
        flush_began = len(before) - 1 - before[::-1].index("flush-begins")
        # Every update before this write returned came before the flush that covered it began.
        assert "update" not in before[flush_began:last_flush_end], log
        assert flush_began < last_flush_end, log
    assert log.count("flush-begins") <= 7  # at most one per write; concurrent writes may share one


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
