"""Series of the embedding service (HTTP and GPU series live in services.common.metrics).

The autoscaler reads ``rag_embedding_requests_in_flight`` and
``rag_embedding_batch_wait_seconds``: both hold on whole GPUs, time-slices and
MIG alike, where NVML utilisation is the whole card's or absent.
"""

from prometheus_client import Counter, Gauge, Histogram

BATCH_SIZE = Histogram(
    "rag_embedding_batch_size", "Texts per batch handed to the model.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
)
BATCH_SECONDS = Histogram(
    "rag_embedding_batch_seconds", "Model time per batch.", buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)
)
BATCH_WAIT = Histogram(
    "rag_embedding_batch_wait_seconds",
    "Time a request waited for its batch to start (queueing behind the model included).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
REQUESTS_IN_FLIGHT = Gauge(
    "rag_embedding_requests_in_flight", "Embed requests inside the service now: waiting for a batch or encoding."
)
PENDING_TEXTS = Gauge(
    "rag_embedding_pending_texts", "Texts waiting for a batch (bounded by RAG_EMBEDDING_MAX_PENDING)."
)
REJECTED = Counter(
    "rag_embedding_rejected_total", "Embed requests answered 503 because RAG_EMBEDDING_MAX_PENDING texts were waiting."
)
FALLBACKS = Counter("rag_embedding_fallback_total", "Batches rerun on the CPU after the GPU ran out of memory on them.")
TEXTS = Counter("rag_embedding_texts_total", "Texts embedded.")
