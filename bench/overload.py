"""/v1/ask at three times its capacity: the queue's backpressure keeps goodput and latency, and loses nothing.

    .venv/bin/python bench/overload.py [--seconds 40] [--factor 3]

Starts its own stack as real processes (redis-server on a free port, then
``python -m services.<name>`` for embedding, retriever, llm worker and
gateway; the worker runs the real local engine with ``RAG_LLM_CONCURRENCY``
jobs in flight and 16-token answers), indexes the demo corpus, then asks one
question over and over (``top_k`` 1; the same prompt every time, so a batch
costs the same in both phases):

1. Capacity, the baseline: a closed loop of twice ``RAG_LLM_CONCURRENCY``
   callers (enough to keep the worker's every slot busy), each asking again as
   soon as it has its answer, for ``--seconds``. Capacity = answers per second;
   its p99 latency is the latency at capacity.
2. Overload: an open loop at ``--factor`` (3) times that capacity for
   ``--seconds``: requests are sent on a fixed schedule whatever happens to the
   earlier ones, as independent clients do. ``RAG_MAX_QUEUE_DEPTH`` (jobs admitted and
   not yet started) is twice ``RAG_LLM_CONCURRENCY``: two batches waiting beside the one generating,
   a limit the baseline's closed loop never reaches.

Reported: goodput (answers per second while overloaded, over the time from the
first request to the last answer, computed the same way as capacity) against
capacity (goal >= 0.95); p99 latency of the answered requests against p99 at
capacity (goal <= 2x); the 503s (queue full, with Retry-After); other errors;
and requests lost, i.e. with neither an answer nor an error (must be 0). The open loop starts on an idle worker, whose
first batch is not full: that start-up counts against goodput. On 2 shared CPU
cores a phase holds only a few dozen answers, so p99 is close to the slowest
one; the ratios move by several percent from run to run.

Runs in about two minutes on 2 CPU cores, most of it the two phases. Prints
``RESULT ...`` last.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
from plot import bars, record  # bench/plot.py, beside this script

from ragpod.processes import free_port
from ragpod.redis_server import start_redis
from ragpod.supervisor import SERVICES, Stack, ingest_demo

ROOT = Path(__file__).resolve().parent.parent

CONCURRENCY = 4
MAX_TOKENS = 16
# One question for every request: every prompt has the same length, so a batch costs the same in both
# phases and the comparison is about the queue, not about which sources a question happened to pull in.
QUESTION = "Which signal scales the LLM workers?"


@dataclass
class Outcome:
    sent: float  # perf_counter when sent
    seconds: float
    status: int | None  # None: no HTTP answer at all (lost)
    error: str = ""
    timings: dict[str, float] | None = None  # of an answer: queue_ms, generate_ms, total_ms, ...

    @property
    def done(self) -> float:
        return self.sent + self.seconds


async def ask(client: httpx.AsyncClient) -> Outcome:
    sent = time.perf_counter()
    try:
        response = await client.post("/v1/ask", json={"question": QUESTION, "top_k": 1})
    except httpx.HTTPError as exc:
        return Outcome(sent, time.perf_counter() - sent, None, type(exc).__name__)
    seconds = time.perf_counter() - sent
    if response.status_code == 200:
        return Outcome(sent, seconds, 200, timings=response.json().get("timings"))
    try:
        error = str(response.json().get("error", ""))
    except ValueError:
        error = response.text[:80]
    if response.status_code == 503 and error == "queue_full" and "retry-after" not in response.headers:
        error = "queue_full_without_retry_after"
    return Outcome(sent, seconds, response.status_code, error)


async def closed_loop(client: httpx.AsyncClient, callers: int, seconds: float) -> list[Outcome]:
    outcomes: list[Outcome] = []
    stop_at = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < stop_at:
            outcomes.append(await ask(client))

    await asyncio.gather(*(caller() for _ in range(callers)))
    return outcomes


async def open_loop(client: httpx.AsyncClient, rate: float, seconds: float) -> list[Outcome]:
    start = time.perf_counter()
    tasks = []
    for number in range(int(rate * seconds)):
        await asyncio.sleep(max(start + number / rate - time.perf_counter(), 0.0))
        tasks.append(asyncio.create_task(ask(client)))
    return list(await asyncio.gather(*tasks))


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(int(0.99 * len(ordered)), len(ordered) - 1)] if ordered else float("nan")


def stages(outcomes: list[Outcome]) -> str:
    """Median queue wait and generation of the answers, where a phase's time went."""
    timed = [o.timings for o in outcomes if o.timings]
    if not timed:
        return "no answers"
    return ", ".join(
        f"{name} p50 {statistics.median(t[name] for t in timed) / 1000:.1f} s" for name in ("queue_ms", "generate_ms")
    )


def answered_per_second(outcomes: list[Outcome]) -> float:
    answered = [o for o in outcomes if o.status == 200]
    if not answered:
        return 0.0
    first_sent = min(o.sent for o in outcomes)
    return len(answered) / (max(o.done for o in answered) - first_sent)


async def drive(gateway: str, seconds: float, factor: float) -> str:
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=gateway, timeout=120, limits=limits) as client:
        for _ in range(2):  # warm up: first generations are slower
            await ask(client)

        baseline = await closed_loop(client, 2 * CONCURRENCY, seconds)
        capacity = answered_per_second(baseline)
        p99_capacity = p99([o.seconds for o in baseline if o.status == 200])
        failed = [o for o in baseline if o.status != 200]
        print(
            f"capacity: {capacity:.2f} answers/s, p99 {p99_capacity:.2f} s, {len(baseline)} requests, "
            f"{len(failed)} not answered {dict(Counter(o.error or str(o.status) for o in failed))}; {stages(baseline)}",
            flush=True,
        )

        rate = factor * capacity
        print(f"overload: {rate:.2f} requests/s for {seconds:.0f} s ...", flush=True)
        loaded = await open_loop(client, rate, seconds)

    goodput = answered_per_second(loaded)
    p99_loaded = p99([o.seconds for o in loaded if o.status == 200])
    kinds = Counter("answered" if o.status == 200 else ("lost" if o.status is None else o.error) for o in loaded)
    rejected = sum(1 for o in loaded if o.status == 503 and o.error == "queue_full")
    lost = kinds.get("lost", 0)
    errors = len(loaded) - kinds.get("answered", 0) - rejected - lost
    median_503 = statistics.median([o.seconds for o in loaded if o.status == 503] or [float("nan")])
    print(
        f"overload: {dict(kinds)}; goodput {goodput:.2f} answers/s, p99 {p99_loaded:.2f} s, "
        f"503s answered in {median_503 * 1000:.0f} ms (median); {stages(loaded)}",
        flush=True,
    )
    answered_s = [o.seconds for o in baseline if o.status == 200], [o.seconds for o in loaded if o.status == 200]
    window = max(o.done for o in loaded) - min(o.sent for o in loaded)
    record(
        "overload",
        {
            "goodput_ratio": round(goodput / capacity, 3),
            "p99_ratio": round(p99_loaded / p99_capacity, 3),
            "lost": lost,
            "rejected_503": rejected,
            "errors": errors,
            "capacity_rps": round(capacity, 3),
            "goodput_rps": round(goodput, 3),
            "offered_rps": round(rate, 3),
            "factor": factor,
        },
        [
            bars(
                f"/v1/ask offered {factor:g}x capacity: goodput {goodput / capacity:.2f} of capacity",
                "requests per second",
                ["capacity (closed loop)", f"offered ({factor:g}x)", "answered", "503 queue full"],
                {"rate": [capacity, rate, goodput, rejected / window]},
            ),
            bars(
                "latency of answered requests",
                "seconds",
                ["p50", "p99"],
                {
                    "at capacity": [statistics.median(answered_s[0]), p99_capacity],
                    "overloaded": [statistics.median(answered_s[1] or [float("nan")]), p99_loaded],
                },
            ),
        ],
        note=f"Real local LLM engine (concurrency {CONCURRENCY}, {MAX_TOKENS} tokens), queue limit "
        f"{2 * CONCURRENCY}; {lost} lost, {errors} other errors. The load generator shares the CPU with the stack.",
    )
    return (
        f"RESULT goodput_ratio={goodput / capacity:.3f} p99_ratio={p99_loaded / p99_capacity:.3f} "
        f"lost={lost} rejected_503={rejected} errors={errors} sent={len(loaded)} answered={kinds.get('answered', 0)} "
        f"capacity_rps={capacity:.3f} goodput_rps={goodput:.3f} offered_rps={rate:.3f} "
        f"p99_capacity_s={p99_capacity:.2f} p99_overload_s={p99_loaded:.2f} factor={factor:g}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=40.0, help="length of each phase")
    parser.add_argument("--factor", type=float, default=3.0, help="offered load as a multiple of capacity")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ragpod-overload-") as tmp:
        data = Path(tmp)
        redis_port = free_port()
        log_dir = ROOT / "data" / "bench" / "overload"
        redis = start_redis(redis_port, log_dir=log_dir)
        stack = Stack(
            ports={name: free_port() for name in SERVICES},
            redis_port=redis_port,
            data_dir=data,
            log_dir=log_dir,
            extra_env={
                "RAG_LLM_MODEL_CACHE_DIR": str(ROOT / "data" / "models"),
                "RAG_LLM_CONCURRENCY": str(CONCURRENCY),
                "RAG_LLM_MAX_NEW_TOKENS": str(MAX_TOKENS),
                "RAG_MAX_QUEUE_DEPTH": str(2 * CONCURRENCY),
                "RAG_ASK_TIMEOUT_SECONDS": "90",
                "RAG_LOG_LEVEL": "warning",
            },
        )
        try:
            print("starting the stack ...", flush=True)
            stack.start(redis=False, ready_timeout=300)
            gateway = f"http://127.0.0.1:{stack.ports['gateway']}"
            ingest_demo(gateway)
            result = asyncio.run(drive(gateway, args.seconds, args.factor))
        finally:
            stack.stop()
            redis.stop()
    print(result, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
