"""bench/ask.py's measure of tracing: paired per question, generation and the receiver stated apart."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ask() -> Iterator[ModuleType]:
    """bench/ask.py (bench/ is not a package; it imports its neighbour ``plot`` by name)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_ask", ROOT / "bench" / "ask.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_ask"] = module  # its dataclasses look their module up by name
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_ask", None)
        sys.path.remove(str(ROOT / "bench"))


def sample(total: float, generate: float) -> dict[str, float]:
    return {"total": total, "generate": generate}


def test_tracing_is_measured_per_question_with_generation_apart(ask: ModuleType) -> None:
    # Generation swings by tens of ms from one answer to the next; the hops differ by 0.5 ms on every question.
    generations = [900.0, 1400.0, 1000.0, 1700.0, 1100.0]
    untraced = [sample(50.0 + i + g, g) for i, g in enumerate(generations)]
    traced = [
        sample(50.5 + i + g + swing, g + swing)
        for i, (g, swing) in enumerate(zip(generations, [80, -60, 90, 70, -40], strict=True))
    ]
    cpu_untraced = {"gateway": 20.0, "retriever": 9.0, "embedding": 160.0, "llm": 6.0, "llm engine": 1000.0}
    cpu_traced = {"gateway": 21.0, "retriever": 9.5, "embedding": 160.25, "llm": 6.25, "llm engine": 1090.0}

    figures = ask.tracing_figures(untraced, traced, cpu_untraced, cpu_traced)

    assert figures["tracing_hops_p50_ms"] == pytest.approx(0.5)
    assert figures["tracing_overhead_p50_ms"] == pytest.approx(70.5)  # the whole, generation's swing included
    assert figures["tracing_cpu_ms"] == pytest.approx(2.0)  # the services, the engine's forward passes left out
    assert figures["tracing_engine_cpu_ms"] == pytest.approx(90.0)  # stated apart


def test_answers_of_the_two_stacks_must_pair_up(ask: ModuleType) -> None:
    with pytest.raises(ValueError, match="2 untraced answers against 1 traced"):
        ask.tracing_figures([sample(10, 5)] * 2, [sample(10, 5)], {}, {})


# One thread that lives on after its work, as the worker's engine thread does.
BUSY_THREAD = """
import threading, time
def burn():
    input()
    end = time.thread_time() + 0.3
    while time.thread_time() < end:
        pass
    done.set()
    stop.wait()
done, stop = threading.Event(), threading.Event()
threading.Thread(target=burn).start()
done.wait()
print("done", flush=True)
input()
stop.set()
"""


def test_the_workers_engine_thread_is_counted_apart(ask: ModuleType) -> None:
    # A process whose one busy thread burns 300 ms of CPU while its main thread waits, as the worker's engine does.
    child = subprocess.Popen(
        [sys.executable, "-c", BUSY_THREAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        time.sleep(0.5)  # started, the interpreter's own start-up CPU spent before the measure
        meter = ask.StackCpu({"llm": child.pid})
        meter.start()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline() == "done\n"
        meter.stop()
        per_question = meter.per_question(2)
    finally:
        child.kill()
        child.wait()
    assert per_question[ask.ENGINE] == pytest.approx(150, abs=25)
    assert per_question["llm"] < 25


def test_the_span_receiver_counts_spans_and_its_own_cpu(ask: ModuleType) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    sink = ask.SpanSink()
    try:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(f"http://127.0.0.1:{sink.port}/v1/traces")))
        tracer = provider.get_tracer("test")
        for name in ("validate", "retrieve", "admit"):
            with tracer.start_as_current_span(name):
                pass
        provider.shutdown()
    finally:
        sink.close()
    assert sink.spans == 3
    assert sink.cpu_ms > 0


async def test_the_search_probe_pairs_calls_to_the_two_stacks_in_turn(ask: ModuleType) -> None:
    order: list[str] = []

    def stack(name: str, delay: float) -> httpx.AsyncClient:
        async def handler(request: httpx.Request) -> httpx.Response:
            order.append(name)
            await asyncio.sleep(delay)
            return httpx.Response(200, json={"sources": []})

        return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://gateway")

    async with stack("untraced", 0.0) as untraced, stack("traced", 0.03) as traced:
        differences = await ask.tracing_probe(untraced, traced, ["q1", "q2"], 1, 6)

    assert len(differences) == 6
    assert sorted(differences)[3] > 15  # the traced stack's 30 ms, seen in its median whoever went first
    measured = order[4:]  # after the warm-up's two pairs
    assert measured == ["untraced", "traced", "traced", "untraced"] * 3
