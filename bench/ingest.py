"""Bulk ingestion against the model alone: how close does ``POST /v1/documents`` get to raw encoding?

    .venv/bin/python bench/ingest.py [--chunks 1500] [--per-request 128] [--in-flight 2]

The documents: docstrings of third-party packages in the virtual environment
(see ``retrieval_quality.py``), repeated under new ids until about
``--chunks`` chunks. Both measurements encode exactly the same texts (each
chunk under its document header, as indexed):

- raw: the model's own time on those chunks during the service run, read from
  the embedding service's ``rag_embedding_batch_seconds`` (chunks over seconds
  the model was busy): the same texts, the same moment, the same load on the
  machine. For the record, ``encode`` in this process in batches of 64 is timed
  before and after the run too (on a shared machine those two can differ a
  lot, which is why they are not the baseline);
- service: a real embedding process and a real retriever process (Qdrant
  Edge on a temporary path); documents sent ``--per-request`` per request with
  ``--in-flight`` requests at a time, timed from the first request to the last
  answer: chunking, embedding over HTTP, keyword vectors and writes included.

Prints ``RESULT ratio=<service/raw> chunks_per_s=<service> raw_per_s=<raw>`` last (goal ratio >= 0.8).
The processes share this machine's cores with the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
from retrieval_quality import docstring_corpus

from ragpod.processes import free_port, ready, start_service, wait_until
from ragpod.tuning import rerun_with_model_tuning
from services.common.memory import freeze_heap
from services.common.schemas import Document
from services.embedding.model import Embedder
from services.retriever.config import Settings
from services.retriever.indexing import plan


def corpus(target_chunks: int, settings: Settings) -> list[Document]:
    base = docstring_corpus(min_chars=200)
    documents: list[Document] = []
    chunks = 0
    round_ = 0
    while chunks < target_chunks:
        for doc_id, text in base.items():
            doc = Document(id=f"{doc_id}#{round_}", text=text)
            documents.append(doc)
            chunks += len(plan([doc], settings.chunk_size, settings.chunk_overlap)[0])
            if chunks >= target_chunks:
                break
        round_ += 1
    return documents


def raw_rate(embedder: Embedder, texts: list[str]) -> float:
    started = time.perf_counter()
    embedder.encode(texts, batch_size=64)
    return len(texts) / (time.perf_counter() - started)


def model_seconds(port: int) -> float:
    """Seconds the embedding service's model has spent on batches so far."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("rag_embedding_batch_seconds_sum"):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError("the embedding service exports no rag_embedding_batch_seconds")


async def send(base_url: str, documents: list[Document], per_request: int, in_flight: int) -> tuple[int, float]:
    batches = [documents[i : i + per_request] for i in range(0, len(documents), per_request)]
    slots = asyncio.Semaphore(in_flight)
    written = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:

        async def post(batch: list[Document]) -> None:
            nonlocal written
            async with slots:
                body = {"documents": [d.model_dump() for d in batch]}
                response = await client.post("/v1/documents", json=body)
                response.raise_for_status()
                written += int(response.json()["chunks"])

        started = time.perf_counter()
        await asyncio.gather(*(post(batch) for batch in batches))
        return written, time.perf_counter() - started


def main() -> int:
    rerun_with_model_tuning()  # the model processes' environment (docs/tuning.md), for this process's model too
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=1500)
    parser.add_argument("--per-request", type=int, default=128)
    parser.add_argument("--in-flight", type=int, default=2)
    args = parser.parse_args()
    settings = Settings()
    documents = corpus(args.chunks, settings)
    chunks, _, _ = plan(documents, settings.chunk_size, settings.chunk_overlap)
    texts = [c.indexed for c in chunks]
    print(f"{len(documents)} documents, {len(texts)} chunks", flush=True)

    embedder = Embedder("", "cpu")
    embedder.encode(texts[:64])  # warm up
    freeze_heap()  # as the embedding service does once its model is loaded
    before = raw_rate(embedder, texts)
    print(f"raw encode in this process (before): {before:.1f} chunks/s", flush=True)

    with tempfile.TemporaryDirectory(prefix="ragpod-ingest-") as tmp:
        emb_port, ret_port = free_port(), free_port()
        common = {"RAG_LOG_LEVEL": "warning", "RAG_EMBEDDING_DEVICE": "cpu"}
        embedding = start_service("embedding", {**common, "RAG_PORT": str(emb_port)}, Path(tmp) / "logs")
        retriever = None
        try:
            wait_until(lambda: ready(emb_port), 180, "embedding", embedding)
            retriever = start_service(
                "retriever",
                {
                    **common,
                    "RAG_PORT": str(ret_port),
                    "RAG_QDRANT_PATH": str(Path(tmp) / "qdrant"),
                    "RAG_EMBEDDING_URL": f"http://127.0.0.1:{emb_port}",
                    "RAG_UPSTREAM_TIMEOUT_SECONDS": "600",  # a loaded CPU can take long over a batch
                },
                Path(tmp) / "logs",
            )
            wait_until(lambda: ready(ret_port), 180, "retriever", retriever)
            warm = [Document(id="warm-up", text="A short document to warm the path up.")]
            asyncio.run(send(f"http://127.0.0.1:{ret_port}", warm, 1, 1))
            model_before = model_seconds(emb_port)
            written, seconds = asyncio.run(
                send(f"http://127.0.0.1:{ret_port}", documents, args.per_request, args.in_flight)
            )
            busy = model_seconds(emb_port) - model_before
        finally:
            if retriever is not None:
                retriever.stop()
            embedding.stop()
    service = written / seconds
    raw = written / busy
    print(f"service: {written} chunks in {seconds:.1f} s = {service:.1f} chunks/s", flush=True)
    print(f"the model alone, inside the service meanwhile: {busy:.1f} s busy = {raw:.1f} chunks/s", flush=True)
    after = raw_rate(embedder, texts)
    print(f"raw encode in this process (after): {after:.1f} chunks/s", flush=True)
    from plot import bars, record  # bench/plot.py, beside this script

    record(
        "ingest",
        {"ratio": round(service / raw, 3), "chunks_per_s": round(service, 1), "raw_per_s": round(raw, 1)},
        [
            bars(
                f"Indexing {written} chunks",
                "chunks/s",
                ["raw encode", "POST /v1/documents"],
                {"throughput": [raw, service]},
            )
        ],
    )
    print(f"RESULT ratio={service / raw:.3f} chunks_per_s={service:.1f} raw_per_s={raw:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
