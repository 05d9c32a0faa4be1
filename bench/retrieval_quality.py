"""Does the right document come first? Recall@1, recall@5 and MRR on a corpus nobody here wrote.

    .venv/bin/python bench/retrieval_quality.py

The corpus: the docstrings of public classes and functions of third-party
packages installed in the project's virtual environment (httpx, click,
structlog, anyio, prometheus_client, redis, tqdm, FastAPI, pydantic-settings,
uvicorn, starlette), each docstring one document whose id is the object's
qualified name. Docstrings shorter than 400 characters, inherited ones and
duplicates are left out. The questions below were written for this benchmark
by reading the target docstrings, phrased the way a user asks, not copied;
each names its one right document. Python's standard library documentation
is deliberately not used.

Three ways are measured on the same documents with the real model and the
real store (Qdrant Edge) through the retriever's own indexing code:

- dense: each chunk embedded alone, vector search only (the old retriever);
- dense+headers: each chunk embedded under its document's header;
- hybrid(dbsf)+headers: dense and BM25 keyword vectors fused by distribution-based
  score fusion;
- hybrid(rrf)+headers: the same two lists fused by reciprocal rank, the default
  (``RAG_SEARCH_FUSION``).

The headed ways are measured again on a held-out set (``bench/quality_heldout.py``:
other packages, 70 questions written the same way), on which nothing is fitted.

A question's rank is the position of its document among the distinct
documents of the top 20 chunks. Prints ``RESULT recall_at_1=... recall_at_5=...
mrr=... dense_recall_at_1=... heldout_recall_at_1=... heldout_recall_at_5=...``
last (the first three for the default settings on the benchmark's own
questions; goals recall_at_1 >= 0.9, recall_at_5 = 1.0).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import pkgutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import get_args

import httpx
import quality_heldout as heldout

from services.common.embedding import EmbeddingClient
from services.common.http import ServiceClient
from services.common.schemas import Document
from services.embedding.model import Embedder
from services.retriever.chunking import chunk_text, point_id
from services.retriever.config import Settings
from services.retriever.indexing import DimensionCheck, index_documents
from services.retriever.store import ChunkPoint, EdgeStore, Fusion, SearchMode, VectorStore
from services.retriever.text import KeywordEncoder

PACKAGES = [
    "httpx",
    "starlette",
    "fastapi",
    "pydantic_settings",
    "structlog",
    "redis.asyncio",
    "prometheus_client",
    "click",
    "tqdm",
    "uvicorn",
    "anyio",
]

QUESTIONS = {
    "How do I set a separate connect timeout and read timeout for HTTP requests?": "httpx.Timeout",
    "How can I cap how many keep-alive connections the HTTP client pool holds?": "httpx.Limits",
    "How do I send requests straight to an ASGI app in the same process, without a network?": "httpx.ASGITransport",
    "Can the HTTP client call a Flask (WSGI) application directly?": "httpx.WSGITransport",
    "In a Click command, how do I show a progress bar while processing a list of items?": "click.termui.progressbar",
    "Ask the user a yes/no question in the terminal and stop the program if they say no": "click.termui.confirm",
    "How do I open the user's text editor to let them change a piece of text?": "click.termui.edit",
    "How can a CLI read one key press from the terminal without waiting for Enter?": "click.termui.getchar",
    "Open a URL or a file in the default application of the operating system from a CLI": "click.termui.launch",
    "Where should a command line tool keep its configuration folder on Windows, macOS and Linux?": (
        "click.utils.get_app_dir"
    ),
    "How do I accept only one of a fixed set of values for a command line option?": "click.types.Choice",
    "Only allow whole numbers between a minimum and a maximum for an option, clamping if asked": "click.types.IntRange",
    "How do I invoke a Click command from a unit test and look at what it printed?": "click.testing.CliRunner",
    "Add a --version flag to my command line program that prints the version and exits": (
        "click.decorators.version_option"
    ),
    "Add the current time to every log entry in ISO 8601 format": "structlog.processors.TimeStamper",
    "How do I render each log event as one line of JSON?": "structlog.processors.JSONRenderer",
    "Write log lines in the logfmt key=value format": "structlog.processors.LogfmtRenderer",
    "Bind a request id so that every log line in the current async context carries it": (
        "structlog.contextvars.bind_contextvars"
    ),
    "Include the file name, function name and line number of the logging call in the log entry": (
        "structlog.processors.CallsiteParameterAdder"
    ),
    "Rename the event key of log entries to msg": "structlog.processors.EventRenamer",
    "Which metric type counts observations into configurable buckets, for request durations?": (
        "prometheus_client.metrics.Histogram"
    ),
    "Which metric should report a value that goes up and down, such as requests in progress?": (
        "prometheus_client.metrics.Gauge"
    ),
    "How does a batch job send its metrics to a Pushgateway?": "prometheus_client.exposition.push_to_gateway",
    "How do I remove a job's metrics from the Pushgateway again?": "prometheus_client.exposition.delete_from_gateway",
    "How do I find the current Redis primary through Sentinel?": "redis.asyncio.sentinel.Sentinel",
    "Send several Redis commands to the server in a single round trip": "redis.asyncio.client.Pipeline",
    "Wait for a free Redis connection instead of failing when all connections are in use": (
        "redis.asyncio.connection.BlockingConnectionPool"
    ),
    "Run a blocking function in a worker thread from async code without blocking the event loop": (
        "anyio.to_thread.run_sync"
    ),
    "How do I call a coroutine function from a worker thread?": "anyio.from_thread.run",
    "Run a CPU-heavy function in a separate worker process from async code": "anyio.to_process.run_sync",
    "Map a function over items in several processes and show a progress bar": "tqdm.contrib.concurrent.process_map",
    "Stop log messages from breaking the progress bar display in the console": (
        "tqdm.contrib.logging.logging_redirect_tqdm"
    ),
    "Run a function after the response has already been sent to the client": "fastapi.background.BackgroundTasks",
    "Authenticate clients with an API key sent in a request header": "fastapi.security.api_key.APIKeyHeader",
    "Ask for a username and password with HTTP Basic authentication": "fastapi.security.http.HTTPBasic",
    "How does an endpoint receive a file that the client uploaded?": "fastapi.datastructures.UploadFile",
    "How do I answer with a 404 and an error message from inside my endpoint?": "fastapi.exceptions.HTTPException",
    "Load configuration values from environment variables into a typed model": "pydantic_settings.main.BaseSettings",
    "Trust the client address in X-Forwarded-For when running behind a reverse proxy": (
        "uvicorn.middleware.proxy_headers.ProxyHeadersMiddleware"
    ),
}


def docstring_corpus(packages: list[str] = PACKAGES, min_chars: int = 400) -> dict[str, str]:
    """Qualified name -> docstring, for every public class and function of ``packages`` that has its own."""
    docs: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in packages:
            root = importlib.import_module(name)
            modules = [root]
            if hasattr(root, "__path__"):
                for info in pkgutil.walk_packages(root.__path__, root.__name__ + "."):
                    if "._" in info.name or ".tests" in info.name:
                        continue
                    try:
                        modules.append(importlib.import_module(info.name))
                    except Exception:  # optional dependencies of a submodule are missing: skip it
                        continue
            for module in modules:
                for attr, obj in vars(module).items():
                    if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                        continue
                    if getattr(obj, "__module__", "") != module.__name__:
                        continue
                    raw = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
                    doc = inspect.cleandoc(raw) if isinstance(raw, str) else ""
                    if len(doc) >= min_chars:
                        docs[f"{module.__name__}.{obj.__qualname__}"] = doc
    counts = Counter(docs.values())
    return {key: text for key, text in sorted(docs.items()) if counts[text] == 1}


def in_process_embedding(embedder: Embedder) -> EmbeddingClient:
    """The retriever's embedding client, answered by the real model in this process."""

    def handle(request: httpx.Request) -> httpx.Response:
        texts = json.loads(request.content)["texts"]
        body = {"vectors": embedder.encode(texts), "model": "m", "dimension": embedder.dimension, "device": "cpu"}
        return httpx.Response(200, json=body)

    return EmbeddingClient(ServiceClient("embedding", "http://embedding", 600, transport=httpx.MockTransport(handle)))


async def index_headed(
    store: VectorStore, embedder: Embedder, docs: dict[str, str], settings: Settings, encoder: KeywordEncoder
) -> None:
    """The retriever's own indexing (chunk headers, keyword vectors), with the model in this process."""
    embedding = in_process_embedding(embedder)
    await index_documents(
        [Document(id=doc_id, text=text) for doc_id, text in docs.items()],
        store=store,
        embedding=embedding,
        encoder=encoder,
        dimensions=DimensionCheck(store),
        chunk_size=settings.chunk_size,
        overlap=settings.chunk_overlap,
        batch_size=settings.embed_batch_size,
        concurrency=settings.embed_concurrency,
    )
    await embedding.aclose()


async def index_plain(store: VectorStore, embedder: Embedder, docs: dict[str, str], settings: Settings) -> None:
    """Chunks embedded alone, without headers: the retriever before chunk headers."""
    encoder = KeywordEncoder(settings.chunk_size)
    await store.ensure_collection(embedder.dimension)
    points: list[ChunkPoint] = []
    for doc_id, text in docs.items():
        chunks = chunk_text(text, settings.chunk_size, settings.chunk_overlap)
        for i, (chunk, vector) in enumerate(zip(chunks, embedder.encode(chunks), strict=True)):
            payload = {"document_id": doc_id, "chunk": i, "chunks": len(chunks), "text": chunk, "metadata": {}}
            points.append(ChunkPoint(point_id(doc_id, i), vector, encoder.document(chunk), payload))
    await store.write(points, {})


async def ranks(
    store: VectorStore,
    embedder: Embedder,
    mode: SearchMode,
    encoder: KeywordEncoder,
    questions: dict[str, str],
    fusion: Fusion = "rrf",
) -> list[int | None]:
    out: list[int | None] = []
    vectors = embedder.encode(list(questions))
    for (question, target), vector in zip(questions.items(), vectors, strict=True):
        hits = await store.search(vector, encoder.query(question), 20, None, mode, fusion)
        documents = list(dict.fromkeys(h.document_id for h in hits))
        out.append(documents.index(target) + 1 if target in documents else None)
    return out


def summary(name: str, found: list[int | None]) -> tuple[float, float, float]:
    n = len(found)
    r1 = sum(1 for r in found if r == 1) / n
    r5 = sum(1 for r in found if r is not None and r <= 5) / n
    mrr = sum(1 / r for r in found if r is not None) / n
    print(f"{name:22s} recall@1 {r1:.3f}  recall@5 {r5:.3f}  MRR {mrr:.3f}", flush=True)
    return r1, r5, mrr


def corpus(packages: list[str], questions: dict[str, str]) -> dict[str, str]:
    docs = docstring_corpus(packages)
    missing = sorted(set(questions.values()) - set(docs))
    if missing:
        raise SystemExit(f"the corpus lacks the documents of some questions: {missing}")
    return docs


async def measure_headed(
    tmp: Path, name: str, docs: dict[str, str], questions: dict[str, str], embedder: Embedder, settings: Settings
) -> dict[str, tuple[float, float, float]]:
    """Every way of searching the headed index: dense, and hybrid with each fusion (the default last)."""
    encoder = KeywordEncoder(settings.chunk_size)
    store = EdgeStore(tmp / name, "c")
    await index_headed(store, embedder, docs, settings, encoder)
    out = {"dense+headers": summary("dense+headers", await ranks(store, embedder, "dense", encoder, questions))}
    fusions: list[Fusion] = [f for f in get_args(Fusion) if f != settings.search_fusion] + [settings.search_fusion]
    found: list[int | None] = []
    for fusion in fusions:
        label = f"hybrid({fusion})+headers"
        found = await ranks(store, embedder, "hybrid", encoder, questions, fusion)
        out[label] = summary(label, found)
    for (question, target), rank in zip(questions.items(), found, strict=True):
        if rank != 1:
            print(f"  rank {rank}: {question!r} -> {target}")
    await store.close()
    return out


async def run() -> int:
    settings = Settings()
    default = (
        f"{settings.search_mode}({settings.search_fusion})+headers"
        if settings.search_mode == "hybrid"
        else ("dense+headers")
    )
    embedder = Embedder("", "cpu")
    docs = corpus(PACKAGES, QUESTIONS)
    held_docs = corpus(heldout.PACKAGES, heldout.QUESTIONS)
    chunks = sum(len(chunk_text(t, settings.chunk_size, settings.chunk_overlap)) for t in docs.values())
    print(f"{len(docs)} documents ({chunks} chunks) from {len(PACKAGES)} packages, {len(QUESTIONS)} questions")
    with tempfile.TemporaryDirectory(prefix="ragpod-quality-") as tmp:
        plain = EdgeStore(Path(tmp) / "plain", "c")
        await index_plain(plain, embedder, docs, settings)
        encoder = KeywordEncoder(settings.chunk_size)
        dense_r1, _, _ = summary("dense", await ranks(plain, embedder, "dense", encoder, QUESTIONS))
        await plain.close()
        main = await measure_headed(Path(tmp), "headed", docs, QUESTIONS, embedder, settings)
        print(
            f"\nheld-out set (bench/quality_heldout.py): {len(held_docs)} documents from "
            f"{len(heldout.PACKAGES)} other packages, {len(heldout.QUESTIONS)} questions"
        )
        held = await measure_headed(Path(tmp), "heldout", held_docs, heldout.QUESTIONS, embedder, settings)
    r1, r5, mrr = main[default]
    from plot import bars, record  # bench/plot.py, beside this script

    ways = list(main)
    record(
        "retrieval_quality",
        {
            "recall_at_1": round(r1, 3),
            "recall_at_5": round(r5, 3),
            "mrr": round(mrr, 3),
            "dense_recall_at_1": round(dense_r1, 3),
            "default": default,
            "questions": len(QUESTIONS),
            "documents": len(docs),
            "heldout_recall_at_1": round(held[default][0], 3),
            "heldout_recall_at_5": round(held[default][1], 3),
            "heldout_mrr": round(held[default][2], 3),
            "heldout_questions": len(heldout.QUESTIONS),
            "heldout_documents": len(held_docs),
            "ways": {way: [round(x, 3) for x in main[way]] for way in ways},
            "heldout_ways": {way: [round(x, 3) for x in held[way]] for way in ways},
        },
        [
            bars(
                f"Recall@1 of the right document ({len(QUESTIONS)} and {len(heldout.QUESTIONS)} held-out questions)",
                "recall@1",
                ways,
                {"benchmark set": [main[w][0] for w in ways], "held-out set": [held[w][0] for w in ways]},
            )
        ],
    )
    print(
        f"RESULT recall_at_1={r1:.3f} recall_at_5={r5:.3f} mrr={mrr:.3f} dense_recall_at_1={dense_r1:.3f} "
        f"heldout_recall_at_1={held[default][0]:.3f} heldout_recall_at_5={held[default][1]:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(run()))
