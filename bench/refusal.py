"""Can a second signal beside the relevance floor refuse more uncovered questions? Measured, not shipped.

    .venv/bin/python bench/refusal.py [--top-k 5]

The gateway refuses a question when no source reaches ``RAG_MIN_RELEVANCE``
(the dense cosine). This script measures one candidate second signal,
question-term coverage, against that floor alone. It indexes two corpora in
process with the real embedding model, the real store (Qdrant Edge) and the
retriever's own indexing and hybrid search:

- the answer corpus: ``demo/corpus`` plus the documents of ``bench/answer_quality.py``,
  asked that benchmark's covered and uncovered questions;
- the docstring corpus of ``bench/retrieval_quality.py``, asked its 39 questions
  (all covered, phrased by a person, often paraphrasing) and the same uncovered ones.

The candidate rule: refuse also when the best source is below a "sure" score
AND fewer than a share of the question's content words (function words dropped,
camelCase split, light stemming) occur in the sources above the floor. Its two
thresholds are chosen by a grid search on those existing sets only: the pair
that refuses the most uncovered questions while refusing no covered one. A
held-out set (``HELD_OUT_*`` below, written before any threshold was chosen)
is then reported on its own, for the floor alone and for the rule.

No LLM is involved: a refusal is decided before any job is queued. Prints
``RESULT ...`` last (``*_floor``: the floor alone; ``*_rule``: floor and rule).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from answer_quality import COVERED, DOCUMENTS, UNCOVERED
from retrieval_quality import QUESTIONS, docstring_corpus, index_headed

from services.common.schemas import Source
from services.embedding.model import Embedder
from services.gateway.config import Settings as GatewaySettings
from services.gateway.pipeline import above_floor
from services.retriever.config import Settings
from services.retriever.store import EdgeStore
from services.retriever.text import KeywordEncoder

ROOT = Path(__file__).resolve().parent.parent

STEM_CHARS = 6
_WORD = re.compile(r"[A-Za-z0-9]+")
_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
STOPWORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing done down during each few for from further had has have having he
    her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor
    not of off on once only or other our ours ourselves out over own same she should so some such than that the
    their theirs them themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    also get gets got let lets may might must shall tell please want need use used using way ways thing things
    one ones much many something anything someone anyone kind sort
    """.split()  # noqa: SIM905 (a word list reads better as text)
)


def stem(word: str) -> str:
    for suffix in ("ies", "ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)] + ("y" if suffix == "ies" else "")
            break
    return word[:STEM_CHARS]


def terms(text: str) -> set[str]:
    """The stems of the content words of ``text``."""
    out: set[str] = set()
    for token in _WORD.findall(text):
        for part in {token.lower(), *(p.lower() for p in _PART.findall(token))}:
            if part in STOPWORDS or (len(part) < 2 and not part.isdigit()):
                continue
            out.add(stem(part))
    return out


def coverage(question: str, texts: Iterable[str]) -> float:
    """The share of the question's content terms that occur in ``texts`` (1.0 for a question with none)."""
    wanted = terms(question)
    if not wanted:
        return 1.0
    found: set[str] = set()
    for text in texts:
        found |= terms(text)
    return len(wanted & found) / len(wanted)


# Written before any threshold of the coverage rule was chosen; used only to report.
HELD_OUT_COVERED = [
    "Which mechanism lets several embedding pods use the same graphics card?",
    "What does the embedding service do when all GPUs are occupied?",
    "What kind of work runs on spot GPU nodes?",
    "What is the maximum number of LLM workers?",
    "How many waiting jobs make KEDA add one more worker?",
    "What happens to a job when the caller has stopped waiting?",
    "How are the ids of chunks derived?",
    "Which nodes does Qdrant run on?",
    "Which taint do the LLM pods tolerate?",
    "Can the retriever share a machine with an LLM pod?",
    "Is the library on Harbor Street open on Sundays?",
    "How much is the late fee for a book?",
    "How many books can a member borrow at once?",
    "How much water fits in the Orbital Kettle?",
    "What should I use to descale the kettle?",
    "Do I need a permit to hike the Glacier Ridge Trail?",
    "Who has to approve a large expense claim at Norrvik Tools?",
    "At what night temperature can tomato seedlings go outdoors?",
    "When do adult Velvet Lantern moths fly?",
    "How wide are the wings of the Velvet Lantern?",
]
HELD_OUT_UNCOVERED = [
    "Does the Harbor Street Library have free wifi?",
    "Who is the current director of the Harbor Street Library?",
    "What colour is the Orbital Kettle?",
    "How much does the Orbital Kettle cost?",
    "Where can I rent skis near the Glacier Ridge Trail?",
    "What is the pension plan at Norrvik Tools?",
    "How many employees does Norrvik Tools have?",
    "Which fertiliser is best for tomatoes?",
    "Is the Velvet Lantern moth poisonous to birds?",
    "How much does a GPU node cost per hour on AWS?",
    "Which version of Kubernetes does ragpod require?",
    "How do I install ragpod on a Raspberry Pi?",
    "What is the melting point of iron?",
    "How tall is Mount Everest?",
    "Translate 'good morning' into Japanese.",
    "What year did the Titanic sink?",
    "How do I change a flat tyre on a bicycle?",
    "Who wrote the novel War and Peace?",
]


async def hits_for(docs: dict[str, str], questions: list[str], embedder: Embedder, top_k: int) -> list[list[Source]]:
    settings = Settings()
    encoder = KeywordEncoder(settings.chunk_size)
    with tempfile.TemporaryDirectory(prefix="ragpod-refusal-") as tmp:
        store = EdgeStore(Path(tmp) / "c", "c")
        await index_headed(store, embedder, docs, settings, encoder)
        out = []
        for question, vector in zip(questions, embedder.encode(questions), strict=True):
            out.append(await store.search(vector, encoder.query(question), top_k, None, settings.search_mode))
        await store.close()
    return out


Row = tuple[str, float, float]  # question, best dense score, term coverage of the sources above the floor


def refused(row: Row, floor: float, sure: float, min_coverage: float) -> bool:
    _, best, share = row
    return best < floor or (best < sure and share < min_coverage)


def rate(rows: list[Row], floor: float, sure: float = 0.0, min_coverage: float = 0.0) -> float:
    return round(sum(refused(r, floor, sure, min_coverage) for r in rows) / len(rows), 3)


async def run(args: argparse.Namespace) -> int:
    floor = GatewaySettings().min_relevance
    embedder = Embedder("", "cpu")
    answer_docs = {p.name: p.read_text() for p in sorted((ROOT / "demo" / "corpus").glob("*.md"))} | DOCUMENTS
    docstrings = docstring_corpus()
    sets: dict[str, tuple[dict[str, str], list[str]]] = {
        "aq_covered": (answer_docs, [q for q, _ in COVERED]),
        "aq_uncovered": (answer_docs, UNCOVERED),
        "rq_covered": (docstrings, list(QUESTIONS)),
        "rq_uncovered": (docstrings, UNCOVERED),
        "held_covered": (answer_docs, HELD_OUT_COVERED),
        "held_uncovered": (answer_docs, HELD_OUT_UNCOVERED),
        "held_uncovered_rq": (docstrings, HELD_OUT_UNCOVERED),
    }
    rows: dict[str, list[Row]] = {}
    for name, (docs, questions) in sets.items():
        found = await hits_for(docs, questions, embedder, args.top_k)
        rows[name] = []
        for question, hits in zip(questions, found, strict=True):
            passed = above_floor(hits, floor)
            best = max((h.score for h in hits), default=0.0)
            share = coverage(question, [f"{h.document_id} {h.text}" for h in passed]) if passed else 0.0
            rows[name].append((question, best, share))

    # Thresholds from the existing sets only: most uncovered refused, no covered one refused.
    choice = (0.0, 0.0)
    best_refused = -1.0
    for sure in [x / 100 for x in range(25, 101)]:
        for min_coverage in [x / 100 for x in range(0, 101, 2)]:
            if rate(rows["aq_covered"], floor, sure, min_coverage) or rate(
                rows["rq_covered"], floor, sure, min_coverage
            ):
                continue
            got = rate(rows["aq_uncovered"], floor, sure, min_coverage) + rate(
                rows["rq_uncovered"], floor, sure, min_coverage
            )
            if got > best_refused:
                best_refused, choice = got, (sure, min_coverage)
    sure, min_coverage = choice
    for name, table in rows.items():
        print(f"\n{name} ({len(table)}): best score, term coverage, floor, floor+rule")
        for row in table:
            mark = ["passed ", "refused"]
            print(
                f"  {row[1]:.3f} {row[2]:.2f} {mark[refused(row, floor, 0, 0)]} "
                f"{mark[refused(row, floor, sure, min_coverage)]}  {row[0]}"
            )
    figures: dict[str, float] = {}
    for name, table in rows.items():
        figures[f"{name}_floor"] = rate(table, floor)
        figures[f"{name}_rule"] = rate(table, floor, sure, min_coverage)
    figures |= {"min_relevance": floor, "sure": sure, "min_coverage": min_coverage, "top_k": args.top_k}
    print("RESULT " + " ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top-k", type=int, default=5, help="Sources per question (the /v1/ask default is 5).")
    raise SystemExit(asyncio.run(run(parser.parse_args())))
