"""Hybrid search latency at 100k chunks: through the retriever's HTTP API, and through the store alone.

    .venv/bin/python bench/retriever.py [--chunks 100000] [--queries 300] [--compare-local 10000]

1. Fills the embedded store (Qdrant Edge, the default of ``make run``) with
   ``--chunks`` chunks: synthetic dense vectors (random unit vectors of the
   model's 384 dimensions) and real BM25 keyword vectors of synthetic text
   drawn from a Zipf-distributed vocabulary, so both indexes have the shape
   of a real corpus. Then lets Qdrant build its HNSW index.
2. Store alone: hybrid searches (prefetch from both indexes, rank fusion,
   dense cosine scores) with real query embeddings, one at a time.
3. HTTP: starts a real embedding service and a real retriever on that store,
   and calls ``POST /v1/search`` at concurrency 1, so each query is embedded
   by the real model first (the path the gateway takes).
4. ``--compare-local N`` (optional): the same hybrid query over N chunks in
   qdrant-client's local mode, the previous embedded store, for the record.

Load generator, retriever and embedding model share this machine's cores.
Prints ``RESULT p99_ms=<HTTP> p50_ms=<HTTP> store_p99_ms=<store alone> chunks=N`` last (goal p99_ms <= 20).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from ragpod.processes import free_port, ready, start_service, wait_until
from ragpod.tuning import rerun_with_model_tuning
from services.retriever.chunking import point_id
from services.retriever.store import ChunkPoint, EdgeStore
from services.retriever.text import KeywordEncoder

DIM = 384
COLLECTION = "ragpod_chunks"
QUESTIONS = [
    "How do I restart a pod that is stuck?",
    "What does error E4711 mean on the controller?",
    "Which port does the gateway listen on?",
    "How many replicas does the vector database run?",
    "When is the queue considered full?",
    "What happens when the GPU runs out of memory?",
    "How are documents split into chunks?",
    "Which metric does the autoscaler read?",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def synthetic_texts(n: int, rng: np.random.Generator) -> list[str]:
    vocab = [f"w{i}" for i in range(30_000)]
    ranks = np.minimum(rng.zipf(1.3, size=n * 60), len(vocab)) - 1
    return [" ".join(vocab[r] for r in ranks[i * 60 : (i + 1) * 60]) for i in range(n)]


async def fill(path: Path, chunks: int, encoder: KeywordEncoder) -> float:
    rng = np.random.default_rng(7)
    store = EdgeStore(path, COLLECTION, index_after=None)  # one index build at the end, not one per 20k
    await store.ensure_collection(DIM)
    started = time.perf_counter()
    batch = 2000
    for start in range(0, chunks, batch):
        n = min(batch, chunks - start)
        vectors = rng.standard_normal((n, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        texts = synthetic_texts(n, rng)
        points = [
            ChunkPoint(
                point_id(f"doc-{(start + i) // 4}", (start + i) % 4),
                vectors[i].tolist(),
                encoder.document(texts[i]),
                {
                    "document_id": f"doc-{(start + i) // 4}",
                    "chunk": (start + i) % 4,
                    "chunks": 4,
                    "title": "",
                    "text": texts[i][:200],
                    "metadata": {"shard": (start + i) % 10},
                },
            )
            for i in range(n)
        ]
        await store.write(points, {})
    await store.optimize()
    seconds = time.perf_counter() - started
    await store.close()
    return seconds


async def store_latency(path: Path, queries: list[list[float]], encoder: KeywordEncoder, rounds: int) -> list[float]:
    store = EdgeStore(path, COLLECTION)
    times = []
    try:
        for i in range(rounds):
            question = QUESTIONS[i % len(QUESTIONS)]
            started = time.perf_counter()
            await store.search(queries[i % len(queries)], encoder.query(question), 5, None, "hybrid")
            times.append((time.perf_counter() - started) * 1000)
    finally:
        await store.close()
    return times[rounds // 10 :]


def http_latency(path: Path, rounds: int, log_dir: Path) -> list[float]:
    emb_port, ret_port = free_port(), free_port()
    common = {"RAG_LOG_JSON": "true", "RAG_LOG_LEVEL": "warning"}
    embedding = start_service("embedding", {**common, "RAG_PORT": str(emb_port)}, log_dir)
    retriever = None
    try:
        wait_until(lambda: ready(emb_port), 180, "embedding", embedding)
        retriever = start_service(
            "retriever",
            {
                **common,
                "RAG_PORT": str(ret_port),
                "RAG_QDRANT_PATH": str(path),
                "RAG_EMBEDDING_URL": f"http://127.0.0.1:{emb_port}",
            },
            log_dir,
        )
        wait_until(lambda: ready(ret_port), 180, "retriever", retriever)
        times, embed_ms, search_ms = [], [], []
        with httpx.Client(base_url=f"http://127.0.0.1:{ret_port}", timeout=30) as client:
            for i in range(rounds):
                body = {"query": QUESTIONS[i % len(QUESTIONS)] + f" ({i})", "top_k": 5}
                started = time.perf_counter()
                response = client.post("/v1/search", json=body)
                times.append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
                embed_ms.append(response.json()["embed_ms"])
                search_ms.append(response.json()["search_ms"])
        skip = rounds // 10
        print(
            f"inside the retriever: query embedding p50 {statistics.median(embed_ms[skip:]):.2f} ms, "
            f"search p50 {statistics.median(search_ms[skip:]):.2f} ms",
            flush=True,
        )
        return times[skip:]
    finally:
        if retriever is not None:
            retriever.stop()
        embedding.stop()


def local_mode_latency(n: int, queries: list[list[float]], encoder: KeywordEncoder, rounds: int) -> tuple[float, float]:
    """The same hybrid query in qdrant-client's local mode (in memory), for comparison."""
    from qdrant_client import QdrantClient, models

    rng = np.random.default_rng(7)
    client = QdrantClient(location=":memory:")
    client.create_collection(
        COLLECTION,
        vectors_config={"dense": models.VectorParams(size=DIM, distance=models.Distance.COSINE)},
        sparse_vectors_config={"bm25": models.SparseVectorParams(modifier=models.Modifier.IDF)},
    )
    started = time.perf_counter()
    for start in range(0, n, 2000):
        m = min(2000, n - start)
        vectors = rng.standard_normal((m, DIM)).astype(np.float32)
        texts = synthetic_texts(m, rng)
        client.upsert(
            COLLECTION,
            points=[
                models.PointStruct(
                    id=start + i,
                    vector={
                        "dense": vectors[i].tolist(),
                        "bm25": models.SparseVector(
                            indices=encoder.document(texts[i]).indices, values=encoder.document(texts[i]).values
                        ),
                    },
                    payload={"text": texts[i][:200]},
                )
                for i in range(m)
            ],
        )
    fill_s = time.perf_counter() - started
    times = []
    for i in range(rounds):
        sparse = encoder.query(QUESTIONS[i % len(QUESTIONS)])
        t0 = time.perf_counter()
        client.query_points(
            COLLECTION,
            prefetch=[
                models.Prefetch(query=queries[i % len(queries)], using="dense", limit=40),
                models.Prefetch(
                    query=models.SparseVector(indices=sparse.indices, values=sparse.values), using="bm25", limit=40
                ),
            ],
            query=models.RrfQuery(rrf=models.Rrf(k=60)),
            limit=5,
            with_payload=True,
        )
        times.append((time.perf_counter() - t0) * 1000)
    client.close()
    return fill_s, percentile(times, 99)


def main() -> int:
    rerun_with_model_tuning()  # the model processes' environment (docs/tuning.md), for this process's model too
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--compare-local", type=int, default=0, metavar="N")
    args = parser.parse_args()
    from services.embedding.model import Embedder

    encoder = KeywordEncoder(800)
    embedder = Embedder("", "cpu")
    queries = embedder.encode(QUESTIONS)
    del embedder
    with tempfile.TemporaryDirectory(prefix="ragpod-bench-") as tmp:
        path = Path(tmp) / "qdrant"
        fill_s = asyncio.run(fill(path, args.chunks, encoder))
        print(f"filled {args.chunks} chunks in {fill_s:.1f} s (HNSW built)", flush=True)
        store_times = asyncio.run(store_latency(path, queries, encoder, args.queries))
        print(
            f"store alone, hybrid top-5: p50 {statistics.median(store_times):.2f} ms, "
            f"p99 {percentile(store_times, 99):.2f} ms",
            flush=True,
        )
        http_times = http_latency(path, args.queries, Path(tmp) / "logs")
        print(
            f"HTTP /v1/search (query embedding included): p50 {statistics.median(http_times):.2f} ms, "
            f"p99 {percentile(http_times, 99):.2f} ms",
            flush=True,
        )
    if args.compare_local:
        local_fill, local_p99 = local_mode_latency(args.compare_local, queries, encoder, min(args.queries, 100))
        edge_fill = fill_s * args.compare_local / args.chunks
        print(
            f"qdrant-client local mode, {args.compare_local} chunks: fill {local_fill:.1f} s, "
            f"hybrid p99 {local_p99:.1f} ms (Qdrant Edge: about {edge_fill:.1f} s for as many, "
            f"p99 {percentile(store_times, 99):.2f} ms at {args.chunks})"
        )
    from plot import bars, record  # bench/plot.py, beside this script

    record(
        "retriever",
        {
            "p99_ms": round(percentile(http_times, 99), 2),
            "p50_ms": round(statistics.median(http_times), 2),
            "store_p99_ms": round(percentile(store_times, 99), 2),
            "chunks": args.chunks,
        },
        [
            bars(
                f"Hybrid search, top 5 of {args.chunks} chunks (Qdrant Edge)",
                "milliseconds",
                ["p50", "p99"],
                {
                    "store alone": [statistics.median(store_times), percentile(store_times, 99)],
                    "HTTP /v1/search, query embedding included": [
                        statistics.median(http_times),
                        percentile(http_times, 99),
                    ],
                },
            )
        ],
        note="Concurrency 1; the embedding service and the retriever run as processes on the same cores.",
    )
    print(
        f"RESULT p99_ms={percentile(http_times, 99):.2f} p50_ms={statistics.median(http_times):.2f} "
        f"store_p99_ms={percentile(store_times, 99):.2f} chunks={args.chunks}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
