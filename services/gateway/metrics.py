"""Series of the gateway (HTTP series live in services.common.metrics)."""

from prometheus_client import Counter, Histogram

REJECTED = Counter("rag_gateway_rejected_total", "Requests turned away before any work.", ["reason"])
ASK_STAGE_SECONDS = Histogram(
    "rag_gateway_ask_stage_seconds",
    "Time per stage of /v1/ask as the gateway sees it.",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
UNANSWERED = Counter(
    "rag_ask_unanswered",
    "Questions answered as not covered by the documents: no source reached RAG_MIN_RELEVANCE, no job was queued.",
)
UNGROUNDED = Counter(
    "rag_ask_ungrounded",
    "Generated answers that did not pass the check (a sentence unsupported, a loop, nothing left): replaced by a "
    "quote of the sources or refused.",
)
ATTRIBUTION_SKIPPED = Counter(
    "rag_ask_attribution_skipped",
    "Answers returned without citations because attribution failed (the embedding service down or slow).",
    ["error"],
)
ANSWER_KINDS = Counter("rag_ask_answers", "Answers after generation, by answer_kind.", ["kind"])
