"""What the Redis queue costs: the worker fed through the queue against the same engine called directly.

    .venv/bin/python bench/queue_hop.py [--engine paced|local] [--concurrency 8] [--jobs 240]

Two measurements, each against its baseline in the same run:

1. Throughput. Baseline: in this process, ``--concurrency`` callers call the
   engine directly, back to back. Queued: the same engine inside a real worker
   process (``services.llm.worker.Worker``, ``--concurrency`` jobs in flight)
   fed through a real Redis stream by twice as many callers that enqueue a job
   and wait for its ``done`` event exactly as the gateway does
   (``JobQueue.enqueue`` + ``JobQueue.events``), so the queue never runs dry.
   Ratio = queued jobs/s over direct jobs/s (goal >= 0.95).
2. The queue hop's own latency: one job at a time through an idle worker with
   an engine that takes no time; hop = time from ``enqueue`` to the caller
   holding ``done``, minus the engine time the worker reports. It covers the
   XADD, the worker's wake-up and reads, the tries counter, the answer claim,
   the publish and the caller's wake-up (goal p50 <= 2 ms).

The default engine, ``paced``, is model-free: every sequence yields one token
per ``--token-ms`` milliseconds and sequences run side by side, as on a GPU
server with continuous batching. That is deliberate. The point is the queue's
overhead, and on a GPU node the model runs in vLLM's process on the GPU, so the
worker's own CPU work overlaps generation instead of competing with it. On this
2-core machine the real CPU model would share the cores with Redis, the worker
and the callers, and the ratio would measure CPU contention more than the
queue. ``--engine local`` runs the real local engine anyway (small
``max_tokens``): its ratio shows that contention, for the record.

Starts its own redis-server on a free port; runs in well under a minute with the
paced engine. Prints ``RESULT ...`` last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from plot import lines, record  # bench/plot.py, beside this script
from redis.asyncio import Redis

from ragpod.processes import Proc, free_port, spawn, wait_until
from ragpod.redis_server import start_redis
from services.common.logging import configure_logging
from services.common.queue import Job, JobQueue
from services.llm.config import Settings
from services.llm.engine import Engine, Generation, GenerationRequest, TokenCallback

ROOT = Path(__file__).resolve().parent.parent

STREAM = "bench:llm:jobs"
MESSAGES = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]


class PacedEngine:
    """One token every ``token_s`` seconds per sequence, ``max_tokens`` tokens, any number side by side."""

    model_name = "paced"
    device = "none"

    def __init__(self, token_s: float) -> None:
        self.token_s = token_s

    async def start(self) -> None:
        pass

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass

    async def generate(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> Generation:
        started = time.perf_counter()
        for index in range(request.max_tokens):
            # Paced against the start, so timer slack does not add up over the tokens.
            await asyncio.sleep(max(started + (index + 1) * self.token_s - time.perf_counter(), 0.0))
            if on_token is not None:
                await on_token(" tok")
        return Generation(
            text=" ".join(["tok"] * request.max_tokens),
            completion_tokens=request.max_tokens,
            prompt_tokens=20,
            finish_reason="length",
        )


def settings_for(args: argparse.Namespace, redis_url: str, concurrency: int) -> Settings:
    return Settings(
        redis_url=redis_url,
        llm_stream=STREAM,
        llm_group=f"{STREAM}:workers",
        llm_dead_letter_stream=f"{STREAM}:dead",
        llm_concurrency=concurrency,
        llm_max_new_tokens=args.tokens,
        llm_model_cache_dir=str(ROOT / "data" / "models"),
        llm_visibility_timeout_seconds=60,
    )


def make_engine(args: argparse.Namespace, settings: Settings) -> Engine:
    if args.engine == "local":
        from services.llm.engine import build_engine

        return build_engine(settings)  # llm_backend "local": the in-process engine
    return PacedEngine(args.token_ms / 1000.0)


# --- the worker process ---------------------------------------------------------------------------------


async def worker_main(args: argparse.Namespace) -> None:
    from services.llm.worker import Worker

    settings = settings_for(args, args.redis_url, args.concurrency)
    engine = make_engine(args, settings)
    await engine.start()
    redis = Redis.from_url(args.redis_url, decode_responses=True)
    worker = Worker(settings, engine, redis, name="bench-worker")
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.request_stop)
    ready_file = Path(args.ready_file)
    await asyncio.to_thread(ready_file.write_text, "ready")
    try:
        await worker.run()
    finally:
        await engine.close()
        await redis.aclose()


def start_worker(args: argparse.Namespace, redis_url: str, concurrency: int, token_ms: float, log_dir: Path) -> Proc:
    ready_file = log_dir / f"worker-{concurrency}-{token_ms}.ready"
    ready_file.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--role=worker",
        f"--redis-url={redis_url}",
        f"--engine={args.engine}",
        f"--concurrency={concurrency}",
        f"--tokens={args.tokens}",
        f"--token-ms={token_ms}",
        f"--ready-file={ready_file}",
    ]
    proc = spawn(f"worker-{concurrency}", command, {}, log_dir)
    wait_until(ready_file.exists, 120, "bench worker", proc)
    return proc


# --- the callers ------------------------------------------------------------------------------------------


async def ask_through_queue(queue: JobQueue, max_tokens: int) -> tuple[float, dict[str, Any]]:
    """One job, as the gateway asks: enqueue, follow its events to ``done``; returns seconds and done's data."""
    job = Job(messages=MESSAGES, timeout_s=120, deadline=time.time() + 120, max_tokens=max_tokens)
    started = time.perf_counter()
    await queue.enqueue(job)
    async for event in queue.events(job.id, block_ms=1000):
        if event.type == "done":
            elapsed = time.perf_counter() - started
            await queue.discard(job.id)
            return elapsed, event.data
        if event.type == "error":
            raise RuntimeError(f"job failed: {event.data}")
    raise RuntimeError("events ended")


async def closed_loop(callers: int, jobs: int, one: Any) -> float:
    """``callers`` clients, each sending its next request when the last is answered; returns jobs/s."""
    left = jobs

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return jobs / (time.perf_counter() - started)


async def direct_throughput(args: argparse.Namespace) -> float:
    settings = settings_for(args, "redis://127.0.0.1:1/0", args.concurrency)
    engine = make_engine(args, settings)
    await engine.start()
    try:
        request = GenerationRequest(MESSAGES, max_tokens=args.tokens)
        await engine.generate(request)  # warm up
        return await closed_loop(args.concurrency, args.jobs, lambda: engine.generate(request))
    finally:
        await engine.close()


async def queued_throughput(args: argparse.Namespace, redis_url: str, log_dir: Path) -> float:
    worker = await asyncio.to_thread(start_worker, args, redis_url, args.concurrency, args.token_ms, log_dir)
    redis = Redis.from_url(redis_url, decode_responses=True, max_connections=4 * args.concurrency + 8)
    try:
        queue = JobQueue(redis, settings_for(args, redis_url, args.concurrency))
        await ask_through_queue(queue, args.tokens)  # warm up
        return await closed_loop(2 * args.concurrency, args.jobs, lambda: ask_through_queue(queue, args.tokens))
    finally:
        await asyncio.to_thread(worker.stop)
        await redis.aclose()


async def hop_latency(args: argparse.Namespace, redis_url: str, log_dir: Path) -> list[float]:
    """Milliseconds the queue adds to one job, one job at a time, with an engine that takes no time."""
    hop_args = argparse.Namespace(**{**vars(args), "engine": "paced", "tokens": 1})
    worker = await asyncio.to_thread(start_worker, hop_args, redis_url, 1, 0.0, log_dir)
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        queue = JobQueue(redis, settings_for(hop_args, redis_url, 1))
        for _ in range(20):  # warm up connections on both sides
            await ask_through_queue(queue, 1)
        hops = []
        for _ in range(args.hops):
            elapsed, done = await ask_through_queue(queue, 1)
            hops.append(elapsed * 1000 - float(done["generate_ms"]))
        return hops
    finally:
        await asyncio.to_thread(worker.stop)
        await redis.aclose()


async def sweep(args: argparse.Namespace, redis_url: str, log_dir: Path) -> dict[int, tuple[float, float]]:
    """Throughput at each ``--sweep`` concurrency: (direct, queued) jobs/s, with 16 jobs per slot."""
    curve = {}
    for concurrency in args.sweep:
        level = argparse.Namespace(**{**vars(args), "concurrency": concurrency, "jobs": 16 * concurrency})
        direct = await direct_throughput(level)
        queued = await queued_throughput(level, redis_url, log_dir)
        print(f"concurrency {concurrency}: direct {direct:.2f} jobs/s, queued {queued:.2f} jobs/s", flush=True)
        curve[concurrency] = (direct, queued)
    return curve


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


async def bench(args: argparse.Namespace) -> str:
    log_dir = ROOT / "data" / "bench" / "queue"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    redis_proc = start_redis(port, log_dir=log_dir)
    redis_url = f"redis://127.0.0.1:{port}/0"
    try:
        print(f"engine={args.engine} concurrency={args.concurrency} jobs={args.jobs} tokens={args.tokens}", flush=True)
        direct = await direct_throughput(args)
        print(f"direct:  {direct:.2f} jobs/s", flush=True)
        queued = await queued_throughput(args, redis_url, log_dir)
        print(f"queued:  {queued:.2f} jobs/s", flush=True)
        hops = await hop_latency(args, redis_url, log_dir)
        p50, p99 = statistics.median(hops), percentile(hops, 0.99)
        print(f"hop:     p50 {p50:.2f} ms, p99 {p99:.2f} ms over {len(hops)} jobs", flush=True)
        curve = await sweep(args, redis_url, log_dir)
    finally:
        redis_proc.stop()
    levels = sorted(curve)
    figures = {
        "throughput_ratio": round(queued / direct, 3),
        "queued_jobs_per_s": round(queued, 2),
        "direct_jobs_per_s": round(direct, 2),
        "hop_p50_ms": round(p50, 2),
        "hop_p99_ms": round(p99, 2),
        "concurrency": args.concurrency,
        "engine": args.engine,
    }
    tokens = f"{args.tokens} tokens of {args.token_ms:g} ms" if args.engine == "paced" else f"{args.tokens} tokens"
    record(
        "queue_hop" if args.engine == "paced" else f"queue_hop-{args.engine}",
        figures,
        [
            lines(
                f"LLM jobs through the Redis queue ({args.engine} engine, {tokens})",
                "jobs in flight (worker concurrency)",
                "jobs/s",
                {
                    "engine called directly": (levels, [curve[c][0] for c in levels]),
                    "through the queue and a worker process": (levels, [curve[c][1] for c in levels]),
                },
            )
        ],
        note=f"Queue hop alone: p50 {p50:.2f} ms, p99 {p99:.2f} ms. Callers, Redis and the worker share the CPU.",
    )
    return (
        f"RESULT throughput_ratio={queued / direct:.3f} queued_jobs_per_s={queued:.2f} direct_jobs_per_s={direct:.2f} "
        f"hop_p50_ms={p50:.2f} hop_p99_ms={p99:.2f} concurrency={args.concurrency} jobs={args.jobs} "
        f"tokens={args.tokens} engine={args.engine}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["paced", "local"], default="paced")
    parser.add_argument("--concurrency", type=int, default=None, help="jobs in flight (default 8 paced, 4 local)")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per throughput run (default 240 paced, 24 local)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per job (default 32 paced, 16 local)")
    parser.add_argument("--token-ms", type=float, default=10.0, help="paced engine: milliseconds per token")
    parser.add_argument("--hops", type=int, default=300, help="jobs for the hop latency")
    parser.add_argument(
        "--sweep",
        type=lambda text: [int(c) for c in text.split(",") if c],
        default=[1, 2, 4, 8, 16],
        help="concurrencies for the throughput curve (comma-separated; empty: none)",
    )
    parser.add_argument("--role", choices=["bench", "worker"], default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    local = args.engine == "local"
    args.concurrency = args.concurrency or (4 if local else 8)
    args.jobs = args.jobs or (24 if local else 240)
    args.tokens = args.tokens or (16 if local else 32)
    configure_logging("warning", json=False)
    if args.role == "worker":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(worker_main(args))
        return 0
    result = asyncio.run(bench(args))
    print(result, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
