"""Series of the embedding service (HTTP and GPU series live in services.common.metrics)."""

from prometheus_client import Counter, Histogram

BATCH_SIZE = Histogram(
    "rag_embedding_batch_size", "Texts per batch handed to the model.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
)
BATCH_SECONDS = Histogram(
    "rag_embedding_batch_seconds", "Model time per batch.", buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)
)
TEXTS = Counter("rag_embedding_texts_total", "Texts embedded.")
