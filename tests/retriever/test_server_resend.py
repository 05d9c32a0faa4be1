"""The Qdrant server backend: a shorter re-send of a document is one request, so a retriever that dies
between two calls to the server cannot leave a document of two versions (qdrant-client's local mode stands in
for the server, as in the other store tests)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from qdrant_client import AsyncQdrantClient

from services.retriever.store import ServerStore
from tests.retriever.test_durability import chunks_of, version


class Died(BaseException):
    """The retriever's process ending where it stood (not an error any code handles)."""


class DiesAtCall:
    """The client, with the process dying as it makes its ``dies_at``-th call that changes points."""

    CHANGES = ("upsert", "delete", "batch_update_points", "overwrite_payload", "set_payload", "delete_vectors")

    def __init__(self, client: AsyncQdrantClient, dies_at: int) -> None:
        self._client = client
        self._dies_at = dies_at
        self.changes = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if name not in self.CHANGES:
            return method

        async def change(*args: Any, **kwargs: Any) -> Any:
            self.changes += 1
            if self.changes == self._dies_at:
                raise Died
            return await method(*args, **kwargs)

        return change


@pytest.mark.parametrize("dies_at", [1, 2])
async def test_a_retriever_dying_inside_a_shorter_resend_leaves_one_version_whole(dies_at: int) -> None:
    client = AsyncQdrantClient(location=":memory:")
    store = ServerStore(client, "chunks")
    await store.ensure_collection(4)
    await store.write(version("manual", "v1", 6), {"manual": 6})
    dying = DiesAtCall(client, dies_at)
    store._client = dying  # type: ignore[assignment]
    with pytest.raises(Died) if dies_at == 1 else contextlib.nullcontext():
        await store.write(version("manual", "v2", 2), {"manual": 2})
    store._client = client
    texts = await chunks_of(store, "manual")
    info = await store.get_document("manual")
    await store.close()
    expected = [f"v1 chunk {i}" for i in range(6)] if dies_at == 1 else [f"v2 chunk {i}" for i in range(2)]
    assert texts == expected
    assert info is not None and info.chunks == len(expected)
    assert dying.changes == 1  # the whole re-send was one request
