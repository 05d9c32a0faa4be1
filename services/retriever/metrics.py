"""Series of the retriever (HTTP series live in services.common.metrics)."""

from prometheus_client import Counter, Histogram

STAGE_SECONDS = Histogram(
    "rag_retriever_stage_seconds",
    "Time per retrieval stage.",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)
CHUNKS_INDEXED = Counter("rag_retriever_chunks_indexed_total", "Chunks written to the vector store.")
DOCUMENTS_INDEXED = Counter("rag_retriever_documents_indexed_total", "Documents indexed.")
DOCUMENTS_DELETED = Counter("rag_retriever_documents_deleted_total", "Documents deleted.")
