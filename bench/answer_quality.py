"""Answer quality over the demo corpus and documents written for this benchmark: facts, refusals, loops, trust.

    .venv/bin/python bench/answer_quality.py [--top-k K] [--max-new-tokens N] [--min-relevance X] [--only SET]

Runs the real stack (redis, embedding, retriever, LLM worker with the packaged
model, gateway) as processes on free ports with the ``make run`` defaults
(``top_k`` and the worker's ``RAG_LLM_MAX_NEW_TOKENS`` unless given), indexes
``demo/corpus``, the README's example document and the documents below, and asks
every question once through ``POST /v1/ask``, in two sets:

- the benchmark's own questions (below): settings are chosen on these;
- a held-out set (``bench/answer_heldout.py``, its own documents, questions about
  parts of the demo corpus not asked here, and questions near the documents'
  subjects that they do not answer): nothing is fitted on it.

In each set, covered questions have a known answer fact (one of a few strings,
case-insensitive); uncovered questions are what the documents do not answer.

Reported per set (each a fraction; the held-out set's with the prefix ``heldout_``):

- ``fact_in_answer``: covered questions whose answer contains the fact; goal >= 0.8;
- ``refused_uncovered``: uncovered questions answered as not covered, before
  generation (no sources, no generation) or after it (``answer_kind``
  ``not_covered``); goal >= 0.9;
- ``refused_covered``: covered questions refused either way; goal 0;
- ``grounded_precision``: answers marked ``grounded`` that are right (the fact, for
  a covered question; nothing is right for an uncovered one); goal >= 0.9;
- ``looping``: answers that repeat a sentence or a run of words, or string
  ``[n]`` markers together; goal 0;
- ``kind_generated`` / ``kind_extractive`` / ``kind_not_covered``: the share of
  each ``answer_kind`` (an answer without the field counts as generated, or as
  not covered when it was refused before generation), and
  ``generated_covered``: the share of covered questions answered by the model's
  own checked text (a goal met by quoting instead of generating shows here);
- ``supported_sentences``: sentences of answers whose support reaches RAG_MIN_SUPPORT;
- ``ask_p50_ms`` and ``generated_ask_p50_ms``: time per answer, all of them and
  those that were generated (noisy on a shared machine).

Baseline in the same run: the retriever's own ``/v1/search`` for every
question. Without a floor every question with at least one hit is generated:
``baseline_generations_uncovered`` counts those among the uncovered questions,
against ``generations_uncovered`` with the floor. The top dense score of every
question is printed too: the lowest covered and the highest uncovered score are
where a floor can sit.

Takes several minutes on two CPU cores (model loads, then about 70 questions).
Prints ``RESULT ...`` last.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import answer_heldout as heldout  # bench/answer_heldout.py, beside this script
import httpx

from ragpod.processes import free_port
from ragpod.supervisor import Stack
from services.gateway.config import Settings as GatewaySettings

ROOT = Path(__file__).resolve().parent.parent

MODEL_CACHE = ROOT / "data" / "models"
# Quality, not speed: a shared or busy machine must not turn slow answers into timeouts, in the gateway or here.
ASK_TIMEOUT_S = 900  # the dequantised packaged LLM, shared with the tests

DOCUMENTS: dict[str, str] = {
    "handbook/vacation.md": "Employees get 27 days of paid vacation.",  # the README's example
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
    ("How many vacation days do employees get?", ("27",)),  # the README's example
    # the demo corpus (demo/corpus); the first two are the questions make run suggests
    ("What does KEDA scale the LLM workers on?", ("depth",)),
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
    "How much does a Kubernetes license cost per node?",
    "How many GPUs does the Harbor Street Library have?",
    "What is the salary of a manager at Norrvik Tools?",
    "Which bird nests next to the Velvet Lantern moth?",
    "How much does the Orbital Kettle cost?",
]


@dataclass
class Tally:
    """What one set's answers came to, for its covered or its uncovered questions."""

    asked: int = 0
    refused: int = 0
    generations: int = 0  # questions that went to the model
    facts: int = 0
    sentences: int = 0
    supported: int = 0
    grounded: int = 0
    grounded_right: int = 0
    looping: int = 0
    kinds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    ms: list[float] = field(default_factory=list)
    generated_ms: list[float] = field(default_factory=list)


KINDS = ("generated", "extractive", "not_covered")


def refused_early(body: dict[str, Any]) -> bool:
    """Answered as not covered before any generation: no sources, no generation."""
    return body["sources"] == [] and body["timings"]["generate_ms"] == 0


def answer_kind(body: dict[str, Any]) -> str:
    """The answer's ``answer_kind``; for a gateway without the field, what it amounts to."""
    kind = body.get("answer_kind")
    if kind is None:
        return "not_covered" if refused_early(body) else "generated"
    return str(kind)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_MARKER_RUN = re.compile(r"(?:\[\d+\]\s*[,;]?\s*){4,}")


def looping(answer: str) -> bool:
    """Repetition a reader notices: a sentence said twice, a run of four words three times, or a string of four
    or more ``[n]`` markers. Measured here on its own, not with the gateway's check."""
    sentences = [" ".join(s.lower().split()) for s in _SENTENCE_END.split(answer)]
    sentences = [s for s in sentences if len(s) > 3]
    if len(sentences) != len(set(sentences)):
        return True
    words = re.findall(r"\w+", answer.lower())
    runs = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    if runs and max(runs.count(run) for run in set(runs)) >= 3:
        return True
    return bool(_MARKER_RUN.search(answer))


def ask(client: httpx.Client, question: str, top_k: int | None, tally: Tally, min_support: float) -> dict[str, Any]:
    started = time.perf_counter()
    payload: dict[str, Any] = {"question": question} if top_k is None else {"question": question, "top_k": top_k}
    response = client.post("/v1/ask", json=payload)
    response.raise_for_status()
    took_ms = (time.perf_counter() - started) * 1000
    body: dict[str, Any] = response.json()
    kind = answer_kind(body)
    tally.asked += 1
    tally.ms.append(took_ms)
    tally.kinds[kind] = tally.kinds.get(kind, 0) + 1
    tally.refused += kind == "not_covered"
    tally.looping += looping(body["answer"])
    if not refused_early(body):
        tally.generations += 1
        if kind == "generated":
            tally.generated_ms.append(took_ms)
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
    parser.add_argument("--top-k", type=int, default=None, help="top_k of every question (default: the API's).")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="RAG_LLM_MAX_NEW_TOKENS (default: the worker's)."
    )
    parser.add_argument("--min-relevance", type=float, default=None, help="Override RAG_MIN_RELEVANCE.")
    parser.add_argument("--only", choices=("own", "heldout"), default=None, help="Ask one set only (no record).")
    parser.add_argument("--verbose", action="store_true", help="Print every answer.")
    args = parser.parse_args()

    env = {
        "RAG_LLM_MODEL_CACHE_DIR": str(MODEL_CACHE),
        "RAG_ASK_TIMEOUT_SECONDS": str(ASK_TIMEOUT_S),
        "RAG_UPSTREAM_TIMEOUT_SECONDS": "300",
    }
    if args.max_new_tokens is not None:
        env["RAG_LLM_MAX_NEW_TOKENS"] = str(args.max_new_tokens)
    if args.min_relevance is not None:
        env["RAG_MIN_RELEVANCE"] = str(args.min_relevance)
    settings = GatewaySettings(**({} if args.min_relevance is None else {"min_relevance": args.min_relevance}))
    data = Path(tempfile.mkdtemp(prefix="answer-quality-"))
    ports = {name: free_port() for name in ("gateway", "embedding", "retriever", "llm")}
    stack = Stack(ports=ports, redis_port=free_port(), data_dir=data, log_dir=data / "logs", extra_env=env)
    print(f"starting the stack (logs in {data / 'logs'})", flush=True)
    stack.start(ready_timeout=ASK_TIMEOUT_S)
    try:
        code = run(stack, settings, args)
    except BaseException:
        print(f"failed; the services' logs are kept in {data / 'logs'}", file=sys.stderr)
        raise
    finally:
        stack.stop()
    shutil.rmtree(data, ignore_errors=True)
    return code


def measure(
    name: str,
    covered_questions: list[tuple[str, tuple[str, ...]]],
    uncovered_questions: list[str],
    gateway: httpx.Client,
    retriever: httpx.Client,
    settings: GatewaySettings,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Asks one set's questions and returns its figures."""
    search_k = args.top_k or 5
    covered_hits = [top_score(retriever, q, search_k) for q, _ in covered_questions]
    uncovered_hits = [top_score(retriever, q, search_k) for q in uncovered_questions]
    covered_scores = [score or 0.0 for score in covered_hits]
    uncovered_scores = [score or 0.0 for score in uncovered_hits]

    covered, uncovered = Tally(), Tally()
    print(f"\n{name}: uncovered ({len(uncovered_questions)}): top score, kind, grounded", flush=True)
    for question, score in zip(uncovered_questions, uncovered_scores, strict=True):
        body = ask(gateway, question, args.top_k, uncovered, settings.min_support)
        loop = " LOOPING" if looping(body["answer"]) else ""
        print(f"  {score:.3f} {answer_kind(body)} {_grounded(body)}{loop}  {question}", flush=True)
        if args.verbose and answer_kind(body) != "not_covered":
            print(f"      {body['answer']!r}")
    print(f"\n{name}: covered ({len(covered_questions)}): top score, kind, fact, grounded", flush=True)
    for (question, facts), score in zip(covered_questions, covered_scores, strict=True):
        body = ask(gateway, question, args.top_k, covered, settings.min_support)
        kind = answer_kind(body)
        right = kind != "not_covered" and any(f.lower() in body["answer"].lower() for f in facts)
        covered.facts += right
        covered.grounded_right += right and bool(body["grounded"])
        loop = " LOOPING" if looping(body["answer"]) else ""
        flags = f"{kind} {'fact' if right else 'no-fact'} {_grounded(body)}{loop}"
        print(f"  {score:.3f} {flags}  {question}", flush=True)
        if args.verbose:
            print(f"      {body['answer']!r}")
            for c in body["citations"]:
                print(f"      [{c['source']}] {c['support']:.2f} {c['sentence']}")

    asked = covered.asked + uncovered.asked
    sentences = covered.sentences + uncovered.sentences
    return {
        "fact_in_answer": round(ratio(covered.facts, covered.asked), 3),
        "refused_uncovered": round(ratio(uncovered.refused, uncovered.asked), 3),
        "refused_covered": round(ratio(covered.refused, covered.asked), 3),
        "grounded_precision": round(ratio(covered.grounded_right, covered.grounded + uncovered.grounded), 3),
        "looping": round(ratio(covered.looping + uncovered.looping, asked), 3),
        **{f"kind_{kind}": round(ratio(covered.kinds[kind] + uncovered.kinds[kind], asked), 3) for kind in KINDS},
        "generated_covered": round(ratio(covered.kinds["generated"], covered.asked), 3),
        "supported_sentences": round(ratio(covered.supported + uncovered.supported, sentences), 3),
        "grounded_answers": covered.grounded + uncovered.grounded,
        "generations_uncovered": uncovered.generations,
        "baseline_generations_uncovered": sum(score is not None for score in uncovered_hits),
        "covered": covered.asked,
        "uncovered": uncovered.asked,
        "covered_min_score": round(min(covered_scores), 3),
        "uncovered_max_score": round(max(uncovered_scores), 3),
        "ask_p50_ms": round(statistics.median(covered.ms + uncovered.ms), 1),
        "generated_ask_p50_ms": round(statistics.median(covered.generated_ms + uncovered.generated_ms or [0.0]), 1),
    }


def _grounded(body: dict[str, Any]) -> str:
    return "grounded" if body["grounded"] else "ungrounded"


def run(stack: Stack, settings: GatewaySettings, args: argparse.Namespace) -> int:
    demo = [{"id": p.name, "text": p.read_text()} for p in sorted((ROOT / "demo" / "corpus").glob("*.md"))]
    written = {**DOCUMENTS, **heldout.DOCUMENTS}
    documents = demo + [{"id": doc_id, "text": text} for doc_id, text in written.items()]
    local = "http://127.0.0.1"
    figures: dict[str, Any] = {}
    with (
        httpx.Client(base_url=f"{local}:{stack.ports['gateway']}", timeout=ASK_TIMEOUT_S) as gateway,
        httpx.Client(base_url=f"{local}:{stack.ports['retriever']}", timeout=60) as retriever,
    ):
        gateway.post("/v1/documents", json={"documents": documents}).raise_for_status()
        # The held-out set first: its figures are the ones the goals are read on.
        if args.only in (None, "heldout"):
            held = measure("held-out", heldout.COVERED, heldout.UNCOVERED, gateway, retriever, settings, args)
            figures.update({f"heldout_{name}": value for name, value in held.items()})
        if args.only in (None, "own"):
            figures.update(measure("own", COVERED, UNCOVERED, gateway, retriever, settings, args))
    figures.update(
        {
            "min_relevance": settings.min_relevance,
            "min_support": settings.min_support,
            "top_k": args.top_k or "default",
            "max_new_tokens": args.max_new_tokens or "default",
        }
    )
    if args.only is None:
        from plot import bars, record  # bench/plot.py, beside this script

        shares = ["fact_in_answer", "refused_uncovered", "refused_covered", "grounded_precision", "looping"]
        record(
            "answer_quality",
            figures,
            [
                bars(
                    "Answers: facts, refusals, trust, loops",
                    "fraction",
                    shares,
                    {
                        "held-out set": [figures[f"heldout_{k}"] for k in shares],
                        "own set": [figures[k] for k in shares],
                    },
                )
            ],
        )
    print("RESULT " + " ".join(f"{name}={value}" for name, value in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
