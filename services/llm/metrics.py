"""Series of the LLM worker (HTTP and GPU series live in services.common.metrics).

The local engine's own series are in ``services.llm.engine_metrics``: the CPU model server runs that
engine too, and must not export the worker's queue series (a Prometheus query over every pod would
read its zeros as workers).
"""

from prometheus_client import Counter, Gauge, Histogram

QUEUE_DEPTH = Gauge(
    "rag_llm_queue_depth",
    "LLM jobs admitted and not yet started by a worker (stream entries never delivered to the group); "
    "the same count RAG_MAX_QUEUE_DEPTH bounds.",
)
QUEUE_WAIT = Histogram(
    "rag_llm_queue_wait_seconds",
    "Time a job waited in the queue before a worker started it.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
GENERATION_SECONDS = Histogram(
    "rag_llm_generation_seconds",
    "Time to generate one answer.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
)
TOKENS_GENERATED = Counter("rag_llm_tokens_generated_total", "Completion tokens generated.")
JOBS_ANSWERED = Counter("rag_llm_jobs_answered_total", "Jobs answered.")
JOBS_DROPPED_DEADLINE = Counter(
    "rag_llm_jobs_dropped_deadline_total", "Jobs dropped without generating because their deadline had passed."
)
JOBS_ABANDONED = Counter(
    "rag_llm_jobs_abandoned_total",
    "Jobs whose caller went away (disconnected, or its deadline passed): not started, or stopped mid-generation.",
)
JOBS_RETRIED = Counter("rag_llm_jobs_retried_total", "Jobs put back on the queue after a failed try.")
JOBS_DEAD_LETTERED = Counter("rag_llm_jobs_dead_lettered_total", "Jobs moved to the dead-letter stream.")
DEAD_LETTERS_TRIMMED = Counter(
    "rag_llm_dead_letters_trimmed_total", "Oldest dead letters removed to keep RAG_LLM_DEAD_LETTER_MAX_LEN."
)
JOBS_RECLAIMED = Counter("rag_llm_jobs_reclaimed_total", "Jobs claimed from a worker that stopped answering.")
JOBS_IN_FLIGHT = Gauge("rag_llm_jobs_in_flight", "Jobs this worker is generating now.")
ENGINE_READY = Gauge(
    "rag_llm_engine_ready", "1 while this worker's engine answers and it reads jobs; 0 while it waits for it."
)
JOBS_UNTRIED = Counter(
    "rag_llm_jobs_untried_total", "Jobs put back without counting a try: the model server refused the connection."
)
