"""Embedding throughput through HTTP against the raw model, with micro-batching on and off.

    .venv/bin/python bench/embedding.py [--device auto|cpu|cuda] [--clients 32] [--seconds 8] [--client lean|httpx]

1. Raw: the model in this process, ``encode`` over short texts at batch sizes
   1..128, the sizes taken in turn three times over and the median of each
   kept; the best batch size is the baseline's (the most the model can do here).
2. HTTP: ``python -m services.embedding`` as its own process (the service's
   container command) on the same device; ``--clients`` concurrent clients
   each send one short text per request, again as soon as answered. First at
   fewer clients, for the throughput-against-concurrency plot; then the
   headline: ``--rounds`` turns of the raw model at its best batch size, the
   raw model at batch ``--clients``, and HTTP at ``--clients`` clients, each
   for half of ``--seconds``, so that a change in the machine's load falls on
   all three alike. The ratio is the median HTTP rate over the median raw
   rate; ``ratio_min``/``ratio_max`` are the rounds' extremes.
3. The same with micro-batching off (``RAG_EMBEDDING_MAX_BATCH=1``).

The load generator runs in this process (one asyncio loop, uvloop where
installed), on the same CPU cores as the service: on a small machine it takes
a share of them, so the ratio is a floor. By default it is lean: each client
holds one keep-alive HTTP/1.1 connection and writes its request and reads the
answer itself (status, headers, ``Content-Length`` body, every answer parsed
and checked), about 30-60 us of CPU a request. ``--client httpx`` drives the
same service through ``httpx.AsyncClient`` instead: about 1.5-2 ms of CPU a
request on a 2-core machine, so there the load generator, not the service,
set the ceiling (about 700 requests/s on one core against an endpoint that
does nothing). Each level prints the load generator's CPU per request and, from
the service's ``/metrics``, its mean batch, the model's time per batch and the
model's idle time between two batches.
Last line: ``RESULT ratio=<HTTP over raw> http_texts_per_s=... raw_texts_per_s=...
unbatched_ratio=...`` (goal: ratio >= 0.9), and ``ratio_vs_raw_batch_<clients>``:
one text per request puts at most one text per client in a batch, so the raw
model at that batch size bounds what HTTP can reach; that ratio is what HTTP
itself costs. (On 2 CPU cores, measured in turns, batch 32 runs at 0.92-0.95
of the best batch.)
Writes docs/benchmarks/embedding.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import statistics
import tempfile
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
from plot import OUT, bars, lines, record  # bench/plot.py, beside this script
from prometheus_client.parser import text_string_to_metric_families

from ragpod.processes import free_port, ready, start_service, wait_until
from ragpod.tuning import rerun_with_model_tuning
from services.common.memory import freeze_heap

WORDS = [
    "kubernetes", "schedules", "pods", "on", "gpu", "nodes", "while", "the", "queue", "protects", "workers",
    "from", "bursts", "of", "questions", "about", "embeddings", "retrieval", "and", "answers", "grounded", "in",
    "documents",
]  # fmt: skip


def texts(count: int, offset: int = 0) -> list[str]:
    """Short texts (7 to 12 words), like questions, numbered from ``offset``; the number is written with three
    digits, so that texts taken in a row have the same lengths on average wherever the row starts. The raw
    model and the HTTP clients both take their texts in a row (the clients from one shared count): before,
    the clients numbered theirs from 100 000 each, which made them 4 % longer in tokens than the raw
    model's, and the model that much slower on them."""
    return [
        " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(7 + (i % 6))) + f" #{i % 1000:03d}"
        for i in range(offset, offset + count)
    ]


class RawModel:
    """The model in this process: ``encode`` over short texts at one batch size, texts per second."""

    def __init__(self, device: str, model_path: str) -> None:
        from services.embedding.model import Embedder

        self.embedder = Embedder(model_path, device)
        self.device: str = self.embedder.device
        self._sent = 0

    def rate(self, batch: int, seconds: float) -> float:
        self.embedder.encode(texts(batch, self._sent), batch_size=batch)  # warm up this shape
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or done < 2 * batch:
            self.embedder.encode(texts(batch, self._sent + done), batch_size=batch)
            done += batch
        self._sent += done + batch
        return done / (time.perf_counter() - start)

    def close(self) -> None:
        del self.embedder
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()


def raw_sweep(model: RawModel, seconds: float, batches: tuple[int, ...], rounds: int) -> dict[int, float]:
    """Texts/s at each batch size: the sizes taken in turn, ``rounds`` times over, the median of each kept,
    so that a busy or quiet spell falls on all sizes alike instead of on whichever was measured then."""
    seen: dict[int, list[float]] = {batch: [] for batch in batches}
    for _ in range(rounds):
        for batch in batches:
            seen[batch].append(model.rate(batch, seconds))
    per_batch = {batch: statistics.median(rates) for batch, rates in seen.items()}
    for batch, rate in per_batch.items():
        spread = ", ".join(f"{r:.0f}" for r in seen[batch])
        print(f"raw  batch {batch:4d}: {rate:8.1f} texts/s (median of {spread})", flush=True)
    return per_batch


class LeanClient:
    """One keep-alive HTTP/1.1 connection, written and read with asyncio streams: the request line, three
    headers and a JSON body out; the status line, the headers and a ``Content-Length`` body in. Every answer
    is checked: status 200 and, parsed with orjson, one vector of the service's dimension."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def embed(self, text: str) -> None:
        body = orjson.dumps({"texts": [text]})
        head = f"POST /v1/embed HTTP/1.1\r\nhost: 127.0.0.1:{self.port}\r\ncontent-type: application/json\r\n"
        request = f"{head}content-length: {len(body)}\r\n\r\n".encode() + body
        reused = self.writer is not None
        try:
            head_bytes = await self._send(request)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            # The server closed an idle keep-alive connection: once more on a new one, as any client does.
            if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise
            await self.aclose()
            head_bytes = await self._send(request)
        assert self.reader is not None
        lines = head_bytes.split(b"\r\n")
        status, length = int(lines[0].split(b" ", 2)[1]), -1
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length < 0:
            raise RuntimeError(f"answer without Content-Length: {lines[:4]!r}")
        answer = await self.reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"/v1/embed answered {status}: {answer[:200]!r}")
        parsed = orjson.loads(answer)
        if len(parsed["vectors"]) != 1 or len(parsed["vectors"][0]) != parsed["dimension"]:
            raise RuntimeError("/v1/embed answered without one vector of its dimension")

    async def _send(self, request: bytes) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(request)
        return await self.reader.readuntil(b"\r\n\r\n")

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.reader = self.writer = None


NUMBERS = itertools.count()
"""The next text's number, one count for every HTTP client: consecutive texts, as the raw model takes them."""


async def drive_lean(port: int, clients: int, seconds: float) -> float:
    conns = [LeanClient(port) for _ in range(clients)]
    try:
        await asyncio.gather(*(conn.embed(texts(1, n)[0]) for n, conn in enumerate(conns)))  # connect, warm up
        done = 0
        stop_at = time.perf_counter() + seconds

        async def one(conn: LeanClient) -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await conn.embed(texts(1, next(NUMBERS))[0])
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(conn) for conn in conns))
        return done / (time.perf_counter() - start)
    finally:
        for conn in conns:
            await conn.aclose()


async def drive_httpx(url: str, clients: int, seconds: float) -> float:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for warm in range(2 * clients):
            await client.post("/v1/embed", json={"texts": texts(1, warm)})
        done = 0
        stop_at = time.perf_counter() + seconds

        async def one() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                response = await client.post("/v1/embed", json={"texts": texts(1, next(NUMBERS))})
                response.raise_for_status()
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        return done / (time.perf_counter() - start)


def run_loop(coroutine: Coroutine[Any, Any, float]) -> float:
    """The lean load generator on uvloop where it is installed (as the service's uvicorn uses it)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


@contextlib.contextmanager
def serving(device: str, model_path: str, env: dict[str, str]) -> Iterator[int]:
    """``python -m services.embedding`` (the container's command) on a free port, until the block ends."""
    port = free_port()
    service_env = {
        "RAG_HOST": "127.0.0.1",
        "RAG_PORT": str(port),
        "RAG_EMBEDDING_DEVICE": device,
        "RAG_EMBEDDING_MODEL": model_path,
        "RAG_LOG_LEVEL": "warning",
        **env,
    }
    with tempfile.TemporaryDirectory() as logs:
        proc = start_service("embedding", service_env, Path(logs))
        try:
            wait_until(lambda: ready(port), 180, "embedding service", proc)
            yield port
        finally:
            proc.stop()


def batches(port: int) -> tuple[float, float, float]:
    """The service's own count of batches, of their texts and of the model's seconds on them (``/metrics``)."""
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"http://127.0.0.1:{port}/metrics").text)}

    def total(family: str, sample: str) -> float:
        return sum(s.value for s in families[family].samples if s.name == f"{family}_{sample}")

    seconds = "rag_embedding_batch_seconds"
    return total(seconds, "count"), total("rag_embedding_batch_size", "sum"), total(seconds, "sum")


def drive(port: int, clients: int, seconds: float, client: str, label: str = "") -> float:
    """``clients`` concurrent clients for ``seconds``: texts/s, printed with the load generator's CPU cost and,
    from the service's metrics, the mean batch, the model's time on it and the time between two batches."""
    before = batches(port)
    cpu_before, started = time.process_time(), time.perf_counter()
    if client == "httpx":
        rate = asyncio.run(drive_httpx(f"http://127.0.0.1:{port}", clients, seconds))
    else:
        rate = run_loop(drive_lean(port, clients, seconds))
    cpu, elapsed = time.process_time() - cpu_before, time.perf_counter() - started
    count, size, model_s = (after - first for after, first in zip(batches(port), before, strict=True))
    client_us = cpu / (rate * seconds) * 1e6
    print(
        f"http {clients:3d} clients: {rate:8.1f} texts/s (load generator {client_us:.0f} us CPU a request; "
        f"service: {size / count:.1f} texts a batch, model {model_s / count * 1e3:.1f} ms a batch, "
        f"{(elapsed - model_s) / count * 1e3:.1f} ms idle between batches) {label}"
    )
    return rate


def main() -> None:
    rerun_with_model_tuning()  # the service's environment (docs/tuning.md), for the raw model and the service
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--model", default="", help="sentence-transformers model directory (default: packaged)")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="RAG_EMBEDDING_MAX_WAIT_MS for the service")
    parser.add_argument("--name", default="embedding", help="JSON written to docs/benchmarks/<name>.json")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service (repeatable)")
    parser.add_argument(
        "--client", default="lean", choices=("lean", "httpx"), help="load generator (httpx: for comparison)"
    )
    parser.add_argument(
        "--levels",
        default="1,4,16",
        type=lambda v: [int(n) for n in v.split(",") if n],
        help="fewer clients, for the plot",
    )
    parser.add_argument("--out", type=Path, default=OUT, help="folder of the JSON (default docs/benchmarks)")
    parser.add_argument("--rounds", type=int, default=4, help="turns of raw and HTTP for the headline ratio")
    args = parser.parse_args()

    model = RawModel(args.device, args.model)
    freeze_heap()  # as the service does once its model is loaded: the load generator shares this process with it
    device = model.device
    sizes = tuple(sorted({1, 8, 16, 32, 64, 128, args.clients}))
    per_batch = raw_sweep(model, args.seconds / 4, sizes, rounds=3)
    best_batch = max(per_batch, key=lambda b: per_batch[b])
    tuned = {"RAG_EMBEDDING_MAX_WAIT_MS": str(args.max_wait_ms)} if args.max_wait_ms is not None else {}
    tuned |= dict(item.split("=", 1) for item in args.env)
    label = str(tuned or "")
    with serving(device, args.model, tuned) as port:
        batched = {n: drive(port, n, args.seconds, args.client, label) for n in args.levels if n != args.clients}
        # The headline: the raw model (best batch, and the batch one text per client allows) and HTTP take
        # turns, so that a change in the machine's load falls on both alike; medians over the rounds.
        raws: list[float] = []
        raws_at_clients: list[float] = []
        https: list[float] = []
        for turn in range(args.rounds):
            raws.append(model.rate(best_batch, args.seconds / 2))
            raws_at_clients.append(model.rate(args.clients, args.seconds / 2))
            https.append(drive(port, args.clients, args.seconds / 2, args.client, label))
            print(
                f"round {turn + 1}: raw batch {best_batch} {raws[-1]:.1f}, batch {args.clients} "
                f"{raws_at_clients[-1]:.1f}, http {https[-1]:.1f} texts/s: ratio {https[-1] / raws[-1]:.3f}",
                flush=True,
            )
    batched[args.clients] = http = statistics.median(https)
    raw = statistics.median(raws)
    with serving(device, args.model, {**tuned, "RAG_EMBEDDING_MAX_BATCH": "1"}) as port:
        unbatched = drive(port, args.clients, args.seconds, args.client, "{'RAG_EMBEDDING_MAX_BATCH': '1'}")
    model.close()
    rounds = [h / r for h, r in zip(https, raws, strict=True)]
    result = {
        "ratio": round(http / raw, 3),
        "http_texts_per_s": round(http, 1),
        "raw_texts_per_s": round(raw, 1),
        "unbatched_ratio": round(unbatched / raw, 3),
        "unbatched_texts_per_s": round(unbatched, 1),
        "best_batch": best_batch,
        "ratio_min": round(min(rounds), 3),
        "ratio_max": round(max(rounds), 3),
        # With one text per request, a batch holds at most one text per client: the raw model at that batch
        # size is what HTTP could reach at best here, and this ratio what HTTP itself costs.
        f"ratio_vs_raw_batch_{args.clients}": round(http / statistics.median(raws_at_clients), 3),
        "rounds": args.rounds,
        "clients": args.clients,
        "client": args.client,
        "device": device,
    }
    concurrency = sorted(batched)
    path = record(
        args.name,
        figures=result,
        charts=[
            lines(
                f"Embedding throughput ({device})",
                "concurrent clients (one text per request)",
                "texts/s",
                {
                    "HTTP, micro-batched": (concurrency, [batched[c] for c in concurrency]),
                    "HTTP, batching off": ([args.clients], [unbatched]),
                    f"raw encode, batch {best_batch}": (concurrency, [raw] * len(concurrency)),
                },
            ),
            bars(
                f"Raw encode by batch size ({device})",
                "texts/s",
                [str(b) for b in per_batch],
                {"encode": list(per_batch.values())},
            ),
        ],
        note=f"Load generator: {args.client}, in the benchmark's process, on the same CPU cores as the service.",
        out=args.out,
    )
    print(f"wrote {path}")
    print("RESULT " + " ".join(f"{key}={value}" for key, value in result.items()))


if __name__ == "__main__":
    main()
