"""Answer quality over the demo corpus and documents written for this benchmark: facts, refusals, support.

    .venv/bin/python bench/answer_quality.py [--top-k 3] [--max-new-tokens 64] [--min-relevance X]

Runs the real stack (redis, embedding, retriever, LLM worker with the packaged
model, gateway) as processes on free ports, indexes ``demo/corpus`` plus the
documents below, and asks every question once through ``POST /v1/ask``:

- covered questions have a known answer fact (one of a few strings, case-insensitive);
- uncovered questions are what the documents do not answer: off-topic ones, a
  one-letter query, and a few near the documents' subjects.

Reported (each a fraction):

- ``refused_uncovered``: uncovered questions answered with ``grounded: false``,
  no sources and no generation (``generate_ms`` 0); goal >= 0.9;
- ``refused_covered``: covered questions refused that way; goal 0;
- ``fact_in_answer``: covered questions whose answer contains the fact;
- ``supported_sentences``: sentences of generated answers whose support
  reaches RAG_MIN_SUPPORT.

Baseline in the same run: the retriever's own ``/v1/search`` for every
question. Without a floor every question with at least one hit is generated:
``baseline_generations_uncovered`` counts those among the uncovered questions,
against ``generations_uncovered`` with the floor. The top dense score of every
question is printed too: the lowest covered and the highest uncovered score are
where a floor can sit.

Takes a few minutes on two CPU cores (model loads, then about 50 generations).
Prints ``RESULT ...`` last.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ragpod.processes import free_port
from ragpod.supervisor import Stack
from services.gateway.config import Settings as GatewaySettings

ROOT = Path(__file__).resolve().parent.parent

MODEL_CACHE = ROOT / "data" / "models"  # the dequantised packaged LLM, shared with the tests

DOCUMENTS: dict[str, str] = {
    "bench/harbor-library.md": (
        "# Harbor Street Library\n\n"
        "The Harbor Street Library opens at 9 a.m. on weekdays and at 11 a.m. on Saturdays; it is closed on "
        "Sundays. It was founded in 1923 by the ship-owner Mira Castell, whose collection of sea charts is "
        "still on show on the first floor. Books are lent for three weeks, and the late fee is 20 cents per "
        "day. Members can borrow at most twelve books at a time."
    ),
    "bench/orbital-kettle.md": (
        "# Orbital Kettle: user guide\n\n"
        "The Orbital Kettle boils 1.7 litres of water in four minutes. It switches itself off 30 seconds after "
        "the water boils, and it will not heat when the jug holds less than 0.5 litres. Descale it once a month "
        "with a spoonful of citric acid. The kettle comes with a warranty of two years; keep the receipt."
    ),
    "bench/glacier-ridge-trail.md": (
        "# Glacier Ridge Trail\n\n"
        "The Glacier Ridge Trail is 14 kilometres long and climbs 820 metres from the Vell hut to the ridge. "
        "Hikers need a permit from June to September, issued at the ranger station in Ostby. Dogs are not "
        "allowed on the trail, because it crosses a nesting area of the snow grouse. Most hikers take six hours."
    ),
    "bench/pay-and-expenses.md": (
        "# Pay and expenses at Norrvik Tools\n\n"
        "Employees of Norrvik Tools are paid on the 25th of each month. Expense claims must be filed within "
        "60 days of the purchase, with the receipt attached. A claim above 500 euros needs the approval of the "
        "employee's manager. Travel is booked through the office in Lund."
    ),
    "bench/tomatoes.md": (
        "# Growing tomatoes in a cold climate\n\n"
        "Sow tomato seeds indoors six weeks before the last frost. Move the seedlings outside only when the "
        "night temperature stays above 10 degrees Celsius. Water the plants at the base, never on the leaves, "
        "and pinch out the side shoots of tall varieties every week."
    ),
    "bench/velvet-lantern.md": (
        "# The Velvet Lantern moth\n\n"
        "The Velvet Lantern (Lumina velutina) is a moth with a wingspan of 38 millimetres. Its caterpillars feed "
        "on alder leaves, and the adults fly in July, mostly along rivers. The species was first described in "
        "1911 from specimens caught near Lake Orsa."
    ),
}

# (question, strings one of which a correct answer contains)
COVERED: list[tuple[str, tuple[str, ...]]] = [
    # the demo corpus (demo/corpus)
    ("What does KEDA scale the LLM workers on?", ("queue",)),
    ("How many embedding pods share one GPU with time-slicing?", ("four", "4")),
    ("What splits one GPU into isolated slices on A100 and H100 cards?", ("MIG",)),
    ("Where does the gateway run?", ("CPU",)),
    ("How many GPU nodes can the Cluster Autoscaler add?", ("four", "4")),
    ("What is the p99 latency target of the retriever?", ("200",)),
    ("What happens to a job whose worker dies?", ("claimed", "another worker", "visibility")),
    ("What does the gateway answer when the queue is deeper than its limit?", ("503", "Retry-After")),
    ("How does Qdrant run in the cluster?", ("StatefulSet", "high-memory", "replica")),
    ("What happens when the same document is sent again?", ("replace",)),
    # documents written for the benchmark
    ("What time does the Harbor Street Library open on Saturdays?", ("11",)),
    ("Who founded the Harbor Street Library?", ("Castell",)),
    ("How long does the Orbital Kettle take to boil?", ("four minutes", "4 minutes")),
    ("How long is the warranty of the Orbital Kettle?", ("two years", "2 years")),
    ("How long is the Glacier Ridge Trail?", ("14",)),
    ("Are dogs allowed on the Glacier Ridge Trail?", ("not allowed", "are not", "no dogs", "not permitted")),
    ("When are employees of Norrvik Tools paid?", ("25",)),
    ("Within how many days must expense claims be filed?", ("60",)),
    ("When should tomato seeds be sown indoors?", ("six weeks", "6 weeks")),
    ("What do the caterpillars of the Velvet Lantern moth feed on?", ("alder",)),
]

UNCOVERED: list[str] = [
    "x",
    "What is the capital of France?",
    "How do I bake sourdough bread?",
    "Who won the football World Cup in 2018?",
    "What is the boiling point of mercury?",
    "Write me a poem about the sea.",
    "How do I reset the password of my home router?",
    "What will the weather be like in Oslo tomorrow?",
    "Which programming language is the fastest?",
    "How many moons does Jupiter have?",
    "Recommend a good science fiction novel.",
    "How do I cook rice in a pressure cooker?",
    "What is the price of an H100 GPU?",
    "Does ragpod run on Windows?",
    "What is the phone number of the Harbor Street Library?",
]


@dataclass
class Tally:
    asked: int = 0
    refused: int = 0
    generations: int = 0
    facts: int = 0
    sentences: int = 0
    supported: int = 0
    grounded: int = 0
    refused_ms: list[float] = field(default_factory=list)
    generated_ms: list[float] = field(default_factory=list)


def refused(body: dict[str, Any]) -> bool:
    return body["grounded"] is False and body["sources"] == [] and body["timings"]["generate_ms"] == 0


def ask(client: httpx.Client, question: str, top_k: int, tally: Tally, min_support: float) -> dict[str, Any]:
    started = time.perf_counter()
    response = client.post("/v1/ask", json={"question": question, "top_k": top_k})
    response.raise_for_status()
    took_ms = (time.perf_counter() - started) * 1000
    body: dict[str, Any] = response.json()
    tally.asked += 1
    if refused(body):
        tally.refused += 1
        tally.refused_ms.append(took_ms)
    else:
        tally.generated_ms.append(took_ms)
        tally.generations += 1
        tally.grounded += bool(body["grounded"])
        tally.sentences += len(body["citations"])
        tally.supported += sum(c["support"] >= min_support for c in body["citations"])
    return body


def top_score(retriever: httpx.Client, question: str, top_k: int) -> float | None:
    """The best dense score among the hits the retriever returns (None: no hit at all)."""
    hits = retriever.post("/v1/search", json={"query": question, "top_k": top_k}).raise_for_status().json()["hits"]
    return max(float(hit["score"]) for hit in hits) if hits else None


def ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--min-relevance", type=float, default=None, help="Override RAG_MIN_RELEVANCE.")
    parser.add_argument("--verbose", action="store_true", help="Print every answer.")
    args = parser.parse_args()

    env = {
        "RAG_LLM_MODEL_CACHE_DIR": str(MODEL_CACHE),
        "RAG_LLM_MAX_NEW_TOKENS": str(args.max_new_tokens),
        # Quality, not speed: a shared or busy machine must not turn slow answers into timeouts.
        "RAG_ASK_TIMEOUT_SECONDS": "900",
        "RAG_UPSTREAM_TIMEOUT_SECONDS": "300",
    }
    if args.min_relevance is not None:
        env["RAG_MIN_RELEVANCE"] = str(args.min_relevance)
    settings = GatewaySettings(**({} if args.min_relevance is None else {"min_relevance": args.min_relevance}))
    data = Path(tempfile.mkdtemp(prefix="answer-quality-"))
    ports = {name: free_port() for name in ("gateway", "embedding", "retriever", "llm")}
    stack = Stack(ports=ports, redis_port=free_port(), data_dir=data, log_dir=data / "logs", extra_env=env)
    print(f"starting the stack (logs in {data / 'logs'})", flush=True)
    stack.start(ready_timeout=300)
    try:
        code = run(stack, settings, args)
    except BaseException:
        print(f"failed; the services' logs are kept in {data / 'logs'}", file=sys.stderr)
        raise
    finally:
        stack.stop()
    shutil.rmtree(data, ignore_errors=True)
    return code


def run(stack: Stack, settings: GatewaySettings, args: argparse.Namespace) -> int:
    demo = [{"id": p.name, "text": p.read_text()} for p in sorted((ROOT / "demo" / "corpus").glob("*.md"))]
    documents = demo + [{"id": doc_id, "text": text} for doc_id, text in DOCUMENTS.items()]
    local = "http://127.0.0.1"
    with (
        httpx.Client(base_url=f"{local}:{stack.ports['gateway']}", timeout=300) as gateway,
        httpx.Client(base_url=f"{local}:{stack.ports['retriever']}", timeout=60) as retriever,
    ):
        gateway.post("/v1/documents", json={"documents": documents}).raise_for_status()
        covered_hits = [top_score(retriever, q, args.top_k) for q, _ in COVERED]
        uncovered_hits = [top_score(retriever, q, args.top_k) for q in UNCOVERED]
        covered_scores = [score or 0.0 for score in covered_hits]
        uncovered_scores = [score or 0.0 for score in uncovered_hits]

        covered, uncovered = Tally(), Tally()
        # Uncovered first: refusals take no generation, so their figure comes early on a slow machine.
        print(f"\nuncovered ({len(UNCOVERED)}): top score, refused", flush=True)
        for question, score in zip(UNCOVERED, uncovered_scores, strict=True):
            body = ask(gateway, question, args.top_k, uncovered, settings.min_support)
            print(f"  {score:.3f} {'refused' if refused(body) else 'GENERATED'}  {question}", flush=True)
            if args.verbose and not refused(body):
                print(f"      {body['answer']!r}")
        print(f"\ncovered ({len(COVERED)}): top score, refused, fact, grounded", flush=True)
        for (question, facts), score in zip(COVERED, covered_scores, strict=True):
            body = ask(gateway, question, args.top_k, covered, settings.min_support)
            has_fact = any(f.lower() in body["answer"].lower() for f in facts)
            covered.facts += has_fact and not refused(body)
            flags = f"{'REFUSED ' if refused(body) else ''}{'fact ' if has_fact else 'no-fact '}"
            print(f"  {score:.3f} {flags}{'grounded' if body['grounded'] else 'ungrounded'}  {question}", flush=True)
            if args.verbose:
                for c in body["citations"]:
                    print(f"      [{c['source']}] {c['support']:.2f} {c['sentence']}")

    generated_sentences = covered.sentences + uncovered.sentences
    figures = {
        "refused_uncovered": round(ratio(uncovered.refused, uncovered.asked), 3),
        "refused_covered": round(ratio(covered.refused, covered.asked), 3),
        "fact_in_answer": round(ratio(covered.facts, covered.asked), 3),
        "supported_sentences": round(ratio(covered.supported + uncovered.supported, generated_sentences), 3),
        "grounded_answers": round(
            ratio(covered.grounded + uncovered.grounded, covered.generations + uncovered.generations), 3
        ),
        "generations_uncovered": uncovered.generations,
        "baseline_generations_uncovered": sum(score is not None for score in uncovered_hits),
        "covered": covered.asked,
        "uncovered": uncovered.asked,
        "sentences": generated_sentences,
        "min_relevance": settings.min_relevance,
        "min_support": settings.min_support,
        "covered_min_score": round(min(covered_scores), 3),
        "uncovered_max_score": round(max(uncovered_scores), 3),
        "uncovered_median_score": round(statistics.median(uncovered_scores), 3),
        "refused_ask_p50_ms": round(statistics.median(covered.refused_ms + uncovered.refused_ms or [0.0]), 1),
        "generated_ask_p50_ms": round(statistics.median(covered.generated_ms + uncovered.generated_ms or [0.0]), 1),
        "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens,
    }
    from plot import bars, record  # bench/plot.py, beside this script

    shares = ["refused_uncovered", "refused_covered", "fact_in_answer", "supported_sentences", "grounded_answers"]
    record(
        "answer_quality",
        figures,
        [bars("Answers: refusals, facts, grounding", "fraction", shares, {"share": [figures[k] for k in shares]})],
    )
    print("RESULT " + " ".join(f"{name}={value}" for name, value in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
