"""The CPU model server exports its own series, not the worker's queue series."""

from __future__ import annotations

import subprocess
import sys

WORKER_SERIES = ("rag_llm_queue_depth", "rag_llm_jobs_in_flight", "rag_llm_engine_ready", "rag_llm_jobs_answered")


def test_the_model_server_process_registers_no_worker_series() -> None:
    """What ``python -m services.llm.server`` imports, engine included, in a fresh process: its /metrics
    would show exactly these series. A zero from it in ``max(rag_llm_queue_depth)`` or
    ``sum(rag_llm_jobs_in_flight)`` would count as a worker."""
    code = (
        "import services.llm.server.__main__, services.llm.local\n"
        "from prometheus_client import REGISTRY, generate_latest\n"
        "print(generate_latest(REGISTRY).decode())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    exported = done.stdout
    assert "rag_llm_engine_batch_size" in exported  # the engine's own series stays
    assert [name for name in WORKER_SERIES if name in exported] == []
