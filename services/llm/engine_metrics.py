"""Series of the local engine, in whichever process runs it: the worker (``RAG_LLM_BACKEND=local``) or
the CPU model server. Kept apart from the worker's series (``services.llm.metrics``) so the model server
does not export those."""

from prometheus_client import Histogram

ENGINE_BATCH_SIZE = Histogram(
    "rag_llm_engine_batch_size", "Sequences generated together by the local engine.", buckets=(1, 2, 4, 8, 16, 32, 64)
)
