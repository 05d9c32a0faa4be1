"""What the four services cost one question: /v1/ask through real processes against the same stages in one process.

    .venv/bin/python bench/ask.py [--rounds 2] [--top-k 1] [--block 4]

Both paths do the same work for every question, at concurrency 1, with the
same models, the same store contents and one generated token (so generation
does not hide the hops):

- services: ``POST /v1/ask`` to the gateway of a stack of real processes
  (``python -m services.<name>`` for gateway, retriever, embedding and LLM
  worker, as ``make run`` starts them, on free ports, with a redis-server of
  their own): API key check and rate limit in Redis, retriever over HTTP,
  query embedding over HTTP, hybrid search in Qdrant Edge, one job through
  the Redis stream to the worker's local engine, while it is generated the
  sources' sentences embedded through the retriever for attribution, then
  the answer's own sentences, the JSON answer.
- in process: the same stage functions called directly in this process: the
  gateway's rate limiter (same Redis), the embedding model's ``encode``, the
  retriever's keyword encoder and store (a store of its own on a temporary
  path, indexed by the retriever's indexing code with the same documents and
  settings), the gateway's prompt, the worker's local engine (same settings),
  the gateway's attribution (the sources' sentences embedded on a thread of
  their own while the engine generates, as the gateway does through the
  retriever).

The questions are made from the demo corpus the stack indexes, one per
sentence ("What is said about <its first words>?"), nothing picked by hand;
``RAG_MIN_RELEVANCE`` is 0 on both paths, so every question goes the whole way
(the not-covered shortcut would skip the queue). Each path makes its own
passes over the same questions, ``--block`` questions at a time, the two
paths taking turns (in process first), ``--rounds`` times over the whole set,
so that a change in the machine's load falls on both alike.
``overhead_p50_ms`` is the p50 of the services' latency (measured by the
client) minus the p50 of the in-process latency, ``ratio`` the first over the
second (goal: overhead p50 <= 15 ms). Generation is the same work on both
paths but, on a CPU, by far the longest and most variable stage, so the
RESULT line also carries ``hops_p50_ms``: the same difference with each
question's generation time (the engine's own measure, on both paths) taken
out. Both paths run torch with one thread (``OMP_NUM_THREADS=1`` unless set):
on a shared machine a multi-threaded model waits at every layer for its
slowest thread.

The client (the services path and the hop probes below) is plain httpx, the
client the services use between themselves.

Then the hops one at a time, each against its own work in process: the
embedding service's ``/v1/embed`` for the question against ``encode``; the
retriever's ``/v1/search`` against embedding plus search; a Redis round trip
(PING). The per-stage timings the gateway returns (embed, search, queue,
generate) are recorded as well, and ``docs/benchmarks/ask.json`` + ``.png``
keep p50 and p99 of every stage. CPU time per question is measured too, for
this process during its own passes and for every process of the stack (Redis
included) during theirs: the machine's load changes it far less than latency,
so ``cpu_overhead_ms`` (services minus in process) is what the hops cost in
work.

With ``--tracing``, a second stack of the same processes runs with tracing on (OpenTelemetry with its
default batching, exporting every span over OTLP/HTTP to a receiver in this process that reads and drops
them, keeping connections open as a collector does), its own Redis. The two stacks answer each question one
right after the other, taking turns at going first, and each figure is the median of the per-question
differences, so the question's own work cancels out: ``tracing_hops_p50_ms`` with each answer's generation
taken out (the figure held to the goal: under 1 ms at p50), ``tracing_overhead_p50_ms`` of the whole. The
whole is not a measure of tracing: tracing adds nothing to generation, but two worker processes of the
same model generate at speeds tens of ms apart, with or without tracing (``--control`` runs the second
stack untraced too and shows it). CPU likewise: ``tracing_cpu_ms`` is each traced process's CPU time per
question (read over both stacks' passes, so that span exports are counted wherever they fall) minus its
untraced twin's, the LLM worker's engine thread left out and stated apart as ``tracing_engine_cpu_ms``;
the receiver's own CPU (a collector's work) is ``receiver_cpu_ms``, not in the services' figure; and
``spans_per_question`` is how many spans one question makes. A question's hops vary by several ms from one
answer to the next on a busy machine (the query embedding most), more than the goal, so one run of a few
dozen questions reads the hops figure only to within a few ms. Hence one more, finer measure of the part of
the path the HTTP hops make (the gateway's, the retriever's and the embedding service's spans, about a third
of a question's): ``--tracing-calls`` pairs of the gateway's ``/v1/search`` to each stack in turn,
``tracing_search_p50_ms`` the median of the differences, ``tracing_search_cpu_ms`` the CPU per call of the
traced stack minus the other's.

The machine may be shared: the load average at the end goes into the JSON.
Needs the converted LLM in data/models (any earlier ``make run`` or test run
makes it; the first start converts it, about 30 s). Runs in about five
minutes on 2 busy CPU cores, most of it generation. Prints ``RESULT ...`` last.
"""

from __future__ import annotations

import os

# One thread per model on both paths: on a shared machine, torch's threads of one process wait for each
# other at every layer whenever one of them loses its core, which makes generation slow and erratic.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import asyncio
import json
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from plot import bars, record
from redis.asyncio import Redis
from starlette.requests import Request

from ragpod.documents import read_documents
from ragpod.processes import Child, free_port
from ragpod.redis_server import start_redis
from ragpod.supervisor import SERVICES, Stack
from ragpod.tuning import rerun_with_model_tuning
from services.common.embedding import EmbeddingClient
from services.common.memory import freeze_heap
from services.common.schemas import Document
from services.embedding.model import Embedder
from services.gateway.attribution import attribute_to, embed_sources, split_sentences
from services.gateway.config import Settings as GatewaySettings
from services.gateway.pipeline import above_floor
from services.gateway.prompt import build_messages, context_texts
from services.gateway.security import Guard
from services.llm.config import Settings as LlmSettings
from services.llm.engine import GenerationRequest, build_engine
from services.retriever.config import Settings as RetrieverSettings
from services.retriever.indexing import DimensionCheck, index_documents
from services.retriever.store import open_store
from services.retriever.text import KeywordEncoder

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "demo" / "corpus"
API_KEY = "bench-key"
RATE_LIMIT = 1_000_000  # per minute: counted on every request, never reached
MODEL_CACHE = ROOT / "data" / "models"

# The same settings for both paths (and the stack's environment, below).
ENV = {
    "RAG_LLM_MODEL_CACHE_DIR": str(MODEL_CACHE),
    "RAG_LLM_MAX_NEW_TOKENS": "1",
    "RAG_MIN_RELEVANCE": "0.0",
    "RAG_API_KEYS": API_KEY,
    "RAG_RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT),
}


def questions_from(corpus: Path) -> list[str]:
    """One question per sentence of the corpus: its first words, asked about; markdown headings left out."""
    questions = []
    for path in sorted(corpus.glob("*.md")):
        text = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#"))
        for sentence in split_sentences(text):
            words = re.findall(r"[\w'-]+", sentence)
            if len(words) >= 4:
                questions.append(f"What is said about {' '.join(words[:8])}?")
    return questions


TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int | None) -> float:
    """CPU time (user + system, every thread) a process has used so far, in ms; 0 when it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) * TICK_MS


def thread_cpu_ms(pid: int | None) -> dict[int, float]:
    """CPU time (user + system) of each live thread of a process so far, in ms, by thread id."""
    out = {}
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) * TICK_MS
    except (OSError, IndexError, ValueError):
        pass
    return out


ENGINE = "llm engine"


class StackCpu:
    """CPU time of a stack's processes over the passes it is measured in, by process; the LLM worker's engine
    thread (the model's forward passes: by far its busiest thread in any pass) counted apart as ``llm engine``,
    so that what the hops cost is not lost in the run-to-run variation of generation."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.ms: dict[str, float] = defaultdict(float)
        self._before: dict[str, tuple[float, dict[int, float]]] = {}

    def start(self) -> None:
        self._before = {name: (cpu_ms(pid), thread_cpu_ms(pid)) for name, pid in self.pids.items()}

    def stop(self) -> None:
        for name, pid in self.pids.items():
            process_before, threads_before = self._before[name]
            self.ms[name] += cpu_ms(pid) - process_before
            if name == "llm":
                grown = [ms - threads_before.get(tid, 0.0) for tid, ms in thread_cpu_ms(pid).items()]
                engine = max(grown, default=0.0)
                self.ms[name] -= engine
                self.ms[ENGINE] += engine

    def per_question(self, questions: int) -> dict[str, float]:
        return {name: value / questions for name, value in self.ms.items()}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


# --- the in-process path --------------------------------------------------------------------------------


class InProcess:
    """Every stage of /v1/ask as a direct call."""

    def __init__(self, redis_url: str, store_dir: Path, top_k: int) -> None:
        self.top_k = top_k
        self.gateway = GatewaySettings(
            redis_url=redis_url, api_keys=API_KEY, rate_limit_per_minute=RATE_LIMIT, min_relevance=0.0
        )
        self.retriever = RetrieverSettings(qdrant_path=str(store_dir))
        self.llm = LlmSettings(redis_url=redis_url, llm_model_cache_dir=str(MODEL_CACHE), llm_max_new_tokens=1)
        self.guard = Guard(self.gateway)
        self.embedder = Embedder("", "cpu")
        self.encoder = KeywordEncoder(self.retriever.chunk_size)
        self.engine = build_engine(self.llm)
        self.store: Any = None
        headers = [(b"authorization", f"Bearer {API_KEY}".encode())]
        self.request = Request({"type": "http", "headers": headers, "client": ("127.0.0.1", 0)})

    async def start(self, documents: list[Document]) -> None:
        await self.engine.start()
        self.store = await open_store(self.retriever)

        def embed(request: httpx.Request) -> httpx.Response:
            vectors = self.embedder.encode(json.loads(request.content)["texts"])
            return httpx.Response(200, json={"vectors": vectors, "model": "m", "dimension": len(vectors[0])})

        client = EmbeddingClient.from_settings(
            self.retriever, self.retriever.upstream_timeout_seconds, httpx.MockTransport(embed)
        )
        try:
            await index_documents(
                documents,
                store=self.store,
                embedding=client,
                encoder=self.encoder,
                dimensions=DimensionCheck(self.store),
                chunk_size=self.retriever.chunk_size,
                overlap=self.retriever.chunk_overlap,
                batch_size=self.retriever.embed_batch_size,
                concurrency=self.retriever.embed_concurrency,
            )
        finally:
            await client.aclose()

    async def close(self) -> None:
        await self.engine.close()
        await self.store.close()
        await self.guard.aclose()

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return self.embedder.encode(texts)

    async def embed_aside(self, texts: list[str]) -> list[list[float]]:
        """``encode`` on a thread of its own, beside the engine's (the sources' sentences, while generating)."""
        return await asyncio.to_thread(self.embedder.encode, texts)

    async def search(self, question: str) -> list[Any]:
        vector = self.embedder.encode([question])[0]
        sparse = self.encoder.query(question)
        return list(await self.store.search(vector, sparse, self.top_k, None, self.retriever.search_mode))

    async def ask(self, question: str) -> dict[str, float]:
        """One question; milliseconds per stage and in all."""
        marks = [time.perf_counter()]
        await self.guard.check(self.request)  # the API key and the rate limit in Redis, as the gateway does
        marks.append(time.perf_counter())
        vector = self.embedder.encode([question])[0]
        marks.append(time.perf_counter())
        hits = await self.store.search(
            vector, self.encoder.query(question), self.top_k, None, self.retriever.search_mode
        )
        marks.append(time.perf_counter())
        sources = above_floor(hits, self.gateway.min_relevance)
        messages = build_messages(question, sources, self.gateway.max_context_chars, self.gateway.system_prompt)
        # As the gateway does: the sources' sentences are embedded while the answer is generated.
        texts = context_texts(sources, self.gateway.max_context_chars)
        sources_embedded = asyncio.create_task(embed_sources(texts, self.embed_aside))
        generation = await self.engine.generate(
            GenerationRequest(messages=messages, max_tokens=1, temperature=self.llm.llm_temperature)
        )
        marks.append(time.perf_counter())
        await attribute_to(generation.text, await sources_embedded, self.embed, self.gateway.min_support)
        marks.append(time.perf_counter())
        names = ("rate_limit", "embed", "search", "generate", "attribute")
        stages = {name: (marks[i + 1] - marks[i]) * 1000 for i, name in enumerate(names)}
        stages["total"] = (marks[-1] - marks[0]) * 1000
        return stages


# --- the services path ----------------------------------------------------------------------------------


async def ask_services(client: httpx.AsyncClient, question: str, top_k: int) -> dict[str, float]:
    started = time.perf_counter()
    response = await client.post("/v1/ask", json={"question": question, "top_k": top_k})
    wall = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    timings = response.json()["timings"]
    stages = {name.removesuffix("_ms"): float(value) for name, value in timings.items()}
    known = sum(stages[name] for name in ("embed", "search", "queue", "generate"))
    stages["rest"] = stages["total"] - known  # hops to the retriever, enqueue, wait for events, attribution
    stages["client"] = wall - stages["total"]  # the gateway's own HTTP in and out, as the client sees it
    stages["total"] = wall
    return stages


async def timed(calls: int, one: Callable[[], Awaitable[object]]) -> list[float]:
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        await one()
        out.append((time.perf_counter() - started) * 1000)
    return out


async def hops(
    inproc: InProcess, stack: Stack, redis_url: str, question: str, calls: int
) -> dict[str, tuple[float, float]]:
    """p50 milliseconds of each hop and of the same work in process, calls interleaved so that the machine's
    load changes both alike."""
    embedding = f"http://127.0.0.1:{stack.ports['embedding']}"
    retriever = f"http://127.0.0.1:{stack.ports['retriever']}"
    redis = Redis.from_url(redis_url)
    async with httpx.AsyncClient(timeout=60) as client:

        async def embed_http() -> None:
            (await client.post(f"{embedding}/v1/embed", json={"texts": [question]})).raise_for_status()

        async def search_http() -> None:
            body = {"query": question, "top_k": inproc.top_k}
            (await client.post(f"{retriever}/v1/search", json=body)).raise_for_status()

        pairs: dict[str, tuple[Callable[[], Awaitable[object]], Callable[[], Awaitable[object]]]] = {
            "embedding": (embed_http, lambda: inproc.embed([question])),
            "retriever": (search_http, lambda: inproc.search(question)),
        }
        out: dict[str, tuple[float, float]] = {}
        try:
            for name, (remote, local) in pairs.items():
                await timed(5, remote)
                remote_ms, local_ms = [], []
                for _ in range(calls):
                    remote_ms += await timed(1, remote)
                    local_ms += await timed(1, local)
                out[name] = (statistics.median(remote_ms), statistics.median(local_ms))
            await timed(5, redis.ping)
            out["redis_rtt"] = (statistics.median(await timed(calls, redis.ping)), 0.0)
        finally:
            await redis.aclose()
    return out


async def tracing_probe(
    untraced: httpx.AsyncClient, traced: httpx.AsyncClient, questions: Sequence[str], top_k: int, calls: int
) -> list[float]:
    """The gateway's ``/v1/search`` (gateway, retriever and embedding service, no generation) of each stack in
    turn, the two taking turns at going first, ``calls`` times: the traced call's milliseconds minus the
    untraced one's, per pair. Without generation a call takes tens of ms, so enough pairs fit in seconds to
    see a fraction of a millisecond."""

    async def one(client: httpx.AsyncClient, question: str) -> float:
        started = time.perf_counter()
        response = await client.post("/v1/search", json={"question": question, "top_k": top_k})
        elapsed = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        return elapsed

    for question in questions[:5]:  # warm-up
        await one(untraced, question)
        await one(traced, question)
    differences = []
    for number in range(calls):
        question = questions[number % len(questions)]
        if number % 2 == 0:
            plain = await one(untraced, question)
            differences.append(await one(traced, question) - plain)
        else:
            with_tracing = await one(traced, question)
            differences.append(with_tracing - await one(untraced, question))
    return differences


class SpanSink:
    """An OTLP/HTTP receiver that decodes what it is sent, counts the spans and keeps none. It runs in this
    process, on the same cores as the stacks: ``cpu_ms`` is the CPU time its handlers took (a collector's
    work, which a cluster does elsewhere; stated apart, never counted in the services')."""

    def __init__(self) -> None:
        self.spans = 0
        self.cpu_ms = 0.0
        self.port = free_port()
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keeps the exporters' connections open, as a collector does

            def do_POST(self) -> None:
                started = time.thread_time()
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                request = ExportTraceServiceRequest.FromString(body)
                spans = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with sink.lock:
                    sink.spans += spans
                    sink.cpu_ms += (time.thread_time() - started) * 1000

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    async def settled(self, quiet_s: float = 6.0) -> None:
        """Returns once no span has arrived for ``quiet_s`` (longer than the SDK's default 5 s between batches)."""
        while True:
            seen = self.spans
            await asyncio.sleep(quiet_s)
            if self.spans == seen:
                return

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Traced:
    """The second stack, tracing on, and where its spans go."""

    stack: Stack
    redis: Child
    sink: SpanSink


def tracing_figures(
    untraced: list[dict[str, float]],
    traced: list[dict[str, float]],
    untraced_cpu: dict[str, float],
    traced_cpu: dict[str, float],
) -> dict[str, float]:
    """What tracing costs one question, from the two stacks' passes over the same questions (``untraced[i]`` and
    ``traced[i]`` answered the same question, one right after the other) and their CPU per question by process.

    Latency is the median of the per-question differences (the question's own work cancels out):
    ``tracing_overhead_p50_ms`` of the whole, ``tracing_hops_p50_ms`` with each answer's generation time taken
    out. Generation is the same work with and without tracing, and on a CPU its run-to-run spread (tens of ms)
    is far larger than what is measured here, so the hops figure is the one held to the goal. CPU likewise:
    ``tracing_cpu_ms`` is every process of the traced stack minus the same process of the other, the LLM
    worker's engine thread left out, and ``tracing_engine_cpu_ms`` that thread's difference, stated apart.
    """
    if len(untraced) != len(traced):
        raise ValueError(f"{len(untraced)} untraced answers against {len(traced)} traced ones")

    def without_generation(sample: dict[str, float]) -> float:
        return sample["total"] - sample["generate"]

    whole = [t["total"] - u["total"] for u, t in zip(untraced, traced, strict=True)]
    hops = [without_generation(t) - without_generation(u) for u, t in zip(untraced, traced, strict=True)]
    by_process = {name: traced_cpu[name] - untraced_cpu.get(name, 0.0) for name in traced_cpu if name != ENGINE}
    return {
        "tracing_overhead_p50_ms": round(statistics.median(whole), 2),
        "tracing_hops_p50_ms": round(statistics.median(hops), 2),
        "tracing_cpu_ms": round(sum(by_process.values()), 2),
        "tracing_engine_cpu_ms": round(traced_cpu.get(ENGINE, 0.0) - untraced_cpu.get(ENGINE, 0.0), 2),
    }


async def run(
    args: argparse.Namespace, stack: Stack, redis: Child, redis_url: str, store_dir: Path, traced: Traced | None = None
) -> str:
    questions = questions_from(CORPUS)
    documents = [Document.model_validate(doc) for doc in read_documents(CORPUS)]
    inproc = InProcess(redis_url, store_dir, args.top_k)
    await inproc.start(documents)
    freeze_heap()  # as each service does once started: the in-process path's models out of every full collection
    headers = {"Authorization": f"Bearer {API_KEY}"}
    gateway = f"http://127.0.0.1:{stack.ports['gateway']}"
    samples: dict[str, list[dict[str, float]]] = {"in_process": [], "services": [], "traced": []}
    # CPU time per question, which the machine's load changes far less than latency: this process during its
    # own passes, and each process of the stack (Redis included) during the services' passes.
    in_process_cpu = 0.0
    stack_cpu = StackCpu({proc.name: proc.pid for proc in [*stack.procs, redis]})
    traced_cpu = StackCpu({proc.name: proc.pid for proc in [*traced.stack.procs, traced.redis]} if traced else {})
    traced_url = f"http://127.0.0.1:{traced.stack.ports['gateway']}" if traced else gateway
    traced_asked = 0
    try:
        async with (
            httpx.AsyncClient(base_url=gateway, timeout=120, headers=headers) as client,
            httpx.AsyncClient(base_url=traced_url, timeout=120, headers=headers) as traced_client,
        ):
            for question in questions[:3]:  # warm up both paths: first calls load lazily
                await inproc.ask(question)
                await ask_services(client, question, args.top_k)
                if traced:
                    await ask_services(traced_client, question, args.top_k)
                    traced_asked += 1

            async def services_pass(block: list[str]) -> None:
                """The block through the stack, and through the traced stack question by question, the two
                taking turns at going first; each stack's CPU is read over the whole pass, so that what its
                processes do in the background (the traced ones' span exports) is counted wherever it falls."""
                paths = [("services", client), ("traced", traced_client)][: 2 if traced else 1]
                stack_cpu.start()
                traced_cpu.start()
                for question in block:
                    for which, on in paths if len(samples["services"]) % 2 == 0 else paths[::-1]:
                        samples[which].append(await ask_services(on, question, args.top_k))
                stack_cpu.stop()
                traced_cpu.stop()

            print(f"{len(questions)} questions, {args.rounds} rounds, top_k {args.top_k}", flush=True)
            for number in range(args.rounds):
                # Passes over a few questions at a time, alternating, so that a change in the machine's load
                # falls on both paths alike.
                for first in range(0, len(questions), args.block):
                    block = questions[first : first + args.block]
                    before = time.process_time()
                    for question in block:
                        samples["in_process"].append(await inproc.ask(question))
                    in_process_cpu += (time.process_time() - before) * 1000
                    await services_pass(block)
                    traced_asked += len(block) if traced else 0
                p50s = {path: statistics.median(s["total"] for s in runs) for path, runs in samples.items() if runs}
                print(
                    f"round {number + 1}: p50 "
                    + ", ".join(f"{path.replace('_', ' ')} {p50:.1f} ms" for path, p50 in p50s.items()),
                    flush=True,
                )
            search_differences: list[float] = []
            question_spans = 0
            search_cpu = [StackCpu(stack_cpu.pids), StackCpu(traced_cpu.pids)]
            if traced:
                await traced.sink.settled()  # every question's spans in (the SDK sends a batch every 5 s)
                question_spans = traced.sink.spans
                for meter in search_cpu:
                    meter.start()
                search_differences = await tracing_probe(
                    client, traced_client, questions, args.top_k, args.tracing_calls
                )
                for meter in search_cpu:
                    meter.stop()
        probes = await hops(inproc, stack, redis_url, questions[0], args.hop_calls)
        if traced:
            await traced.sink.settled()  # the probe's last spans, for the receiver's CPU
    finally:
        await inproc.close()

    def stage_pcts(path: str, q: float) -> dict[str, float]:
        by_stage: dict[str, list[float]] = defaultdict(list)
        for sample in samples[path]:
            for name, value in sample.items():
                by_stage[name].append(value)
        return {name: pct(values, q) for name, values in by_stage.items()}

    inp50, inp99 = stage_pcts("in_process", 0.5), stage_pcts("in_process", 0.99)
    svc50, svc99 = stage_pcts("services", 0.5), stage_pcts("services", 0.99)
    for label, p50, p99 in (("in process", inp50, inp99), ("services", svc50, svc99)):
        stages = ", ".join(f"{name} {p50[name]:.1f}/{p99[name]:.1f}" for name in p50)
        print(f"{label} p50/p99 ms: {stages}", flush=True)
    for name, (http, local) in probes.items():
        print(f"hop {name}: {http:.2f} ms p50" + (f" against {local:.2f} ms in process" if local else ""), flush=True)

    def without_generation(path: str) -> list[float]:
        return [sample["total"] - sample["generate"] for sample in samples[path]]

    asked = len(samples["services"])
    cpu_each = {"in_process": in_process_cpu / asked, **stack_cpu.per_question(asked)}
    cpu_services = sum(value for name, value in cpu_each.items() if name != "in_process")
    print(
        "CPU ms per question: in process "
        + f"{cpu_each['in_process']:.1f}; services {cpu_services:.1f} ("
        + ", ".join(f"{name} {value:.1f}" for name, value in cpu_each.items() if name != "in_process")
        + ")",
        flush=True,
    )
    hops_p50 = statistics.median(without_generation("services")) - statistics.median(without_generation("in_process"))
    overhead_p50 = svc50["total"] - inp50["total"]
    overhead_p99 = svc99["total"] - inp99["total"]
    ratio = svc50["total"] / inp50["total"]
    figures = {
        "overhead_p50_ms": round(overhead_p50, 2),
        "overhead_p99_ms": round(overhead_p99, 2),
        "ratio": round(ratio, 3),
        "hops_p50_ms": round(hops_p50, 2),
        "cpu_overhead_ms": round(cpu_services - cpu_each["in_process"], 2),
        "cpu_services_ms": round(cpu_services, 2),
        "cpu_in_process_ms": round(cpu_each["in_process"], 2),
        "services_p50_ms": round(svc50["total"], 2),
        "services_p99_ms": round(svc99["total"], 2),
        "in_process_p50_ms": round(inp50["total"], 2),
        "in_process_p99_ms": round(inp99["total"], 2),
        "embedding_hop_p50_ms": round(probes["embedding"][0] - probes["embedding"][1], 2),
        "retriever_hop_p50_ms": round(probes["retriever"][0] - probes["retriever"][1], 2),
        "redis_rtt_p50_ms": round(probes["redis_rtt"][0], 3),
        "questions": len(questions) * args.rounds,
    }
    if traced:
        pairs = list(zip(samples["services"], samples["traced"], strict=True))
        print(
            "tracing ms per stage, p50 of the per-question differences: "
            + ", ".join(
                f"{name} {statistics.median(t[name] - u[name] for u, t in pairs):+.2f}" for name in samples["traced"][0]
            ),
            flush=True,
        )
        traced_each = traced_cpu.per_question(len(samples["traced"]))
        print(
            "tracing CPU ms per question (traced minus untraced): "
            + ", ".join(f"{name} {value - cpu_each.get(name, 0.0):+.2f}" for name, value in traced_each.items()),
            flush=True,
        )
        figures |= tracing_figures(samples["services"], samples["traced"], cpu_each, traced_each)
        figures["tracing_search_p50_ms"] = round(statistics.median(search_differences), 3)
        calls = len(search_differences) + 5  # and the warm-up's
        untraced_search, traced_search = (meter.per_question(calls) for meter in search_cpu)
        figures["tracing_search_cpu_ms"] = round(sum(traced_search.values()) - sum(untraced_search.values()), 3)
        figures["traced_p50_ms"] = round(stage_pcts("traced", 0.5)["total"], 2)
        figures["spans_per_question"] = round(question_spans / traced_asked, 1)
        # Per span: the receiver also took the search probe's spans.
        per_span = traced.sink.cpu_ms / traced.sink.spans if traced.sink.spans else 0.0
        figures["receiver_cpu_ms"] = round(per_span * question_spans / traced_asked, 2)
        figures["spans_exported"] = traced.sink.spans
    groups = ["front door", "embed", "search", "queue", "generate", "rest", "total"]
    svc_keys = ["client", "embed", "search", "queue", "generate", "rest", "total"]
    in_keys = ["rate_limit", "embed", "search", None, "generate", "attribute", "total"]

    def column(values: dict[str, float], keys: Sequence[str | None]) -> list[float]:
        return [round(values[k], 2) if k is not None else 0.0 for k in keys]

    charts = [
        bars(
            f"/v1/ask at concurrency 1: p50 per stage; overhead p50 {overhead_p50:.1f} ms",
            "milliseconds (log scale)",
            groups,
            {"in process": column(inp50, in_keys), "four services": column(svc50, svc_keys)},
            log=True,
        ),
        bars(
            f"p99 per stage; overhead p99 {overhead_p99:.1f} ms",
            "milliseconds (log scale)",
            groups,
            {"in process": column(inp99, in_keys), "four services": column(svc99, svc_keys)},
            log=True,
        ),
    ]
    names = [name for name in cpu_each if name != "in_process"]
    charts.append(
        bars(
            f"CPU time per question (ms); the services use {cpu_services - cpu_each['in_process']:.1f} ms more",
            "CPU milliseconds (log scale)",
            ["in process", "services, all", *names],
            {"per question": [cpu_each["in_process"], cpu_services, *(cpu_each[name] for name in names)]},
            log=True,
        )
    )
    if args.control:
        return "RESULT " + " ".join(f"{k}={v}" for k, v in figures.items())
    record(
        "ask",
        figures,
        charts,
        note="front door: in process the API key and rate limit; through the services everything between the client "
        "and the gateway's pipeline (HTTP in and out, rate limit). rest: in process the attribution; through the "
        "services also the retriever hop, the enqueue and the wait for events. One generated token.",
    )
    return "RESULT " + " ".join(f"{k}={v}" for k, v in figures.items())


def main() -> int:
    rerun_with_model_tuning()  # the model processes' environment (docs/tuning.md), for the in-process path too
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="passes of each path over every question")
    parser.add_argument("--top-k", type=int, default=1, help="sources per question (fewer: a shorter prompt)")
    parser.add_argument("--block", type=int, default=4, help="questions per pass before the other path's pass")
    parser.add_argument("--hop-calls", type=int, default=60, help="calls per hop probe")
    parser.add_argument("--tracing", action="store_true", help="also a stack with tracing on (see above)")
    parser.add_argument(
        "--tracing-calls", type=int, default=200, help="with --tracing: pairs of /v1/search calls (see above)"
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="with --tracing: the second stack with tracing off too, what the measure reads when tracing costs "
        "nothing (nothing recorded)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stack on the way out
    with tempfile.TemporaryDirectory(prefix="ragpod-ask-") as tmp:
        data = Path(tmp)
        log_dir = ROOT / "data" / "bench" / "ask"
        redis_port = free_port()
        redis = start_redis(redis_port, log_dir=log_dir)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        stack = Stack(
            ports={name: free_port() for name in SERVICES},
            redis_port=redis_port,
            data_dir=data,
            log_dir=log_dir,
            extra_env=ENV,
        )
        traced: Traced | None = None
        if args.tracing:
            sink, traced_redis_port = SpanSink(), free_port()
            traced_env = {**ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}"}
            if args.control:
                traced_env["OTEL_SDK_DISABLED"] = "true"
            traced = Traced(
                Stack(
                    ports={name: free_port() for name in SERVICES},
                    redis_port=traced_redis_port,
                    data_dir=data / "traced",
                    log_dir=log_dir / "traced",
                    extra_env=traced_env,
                ),
                start_redis(traced_redis_port, log_dir=log_dir / "traced"),
                sink,
            )
        try:
            print("starting the stack ...", flush=True)
            documents = {"documents": read_documents(CORPUS)}
            headers = {"Authorization": f"Bearer {API_KEY}"}
            for started in [stack, *([traced.stack] if traced else [])]:
                started.start(redis=False, ready_timeout=300)
                gateway = f"http://127.0.0.1:{started.ports['gateway']}"
                httpx.post(f"{gateway}/v1/documents", json=documents, headers=headers, timeout=300).raise_for_status()
            result = asyncio.run(run(args, stack, redis, redis_url, data / "in-process-store", traced))
        finally:
            stack.stop()
            redis.stop()
            if traced:
                traced.stack.stop()
                traced.redis.stop()
                traced.sink.close()
    print(result, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
