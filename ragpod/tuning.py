"""The environment of the processes that run a model: how long torch's OpenMP threads spin before they
sleep, and how much freed memory glibc's allocator keeps instead of handing it back to the kernel.

These are read by libgomp and glibc themselves when a process starts, so they are environment settings of
the process, set from outside it: the same values are ENV lines of the embedding and LLM images and the
``model-tuning`` ConfigMap of ``deploy/k8s``; ``docs/tuning.md`` says what each one does. A value already
in the environment of whoever starts a process wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# The services whose processes load a model (the LLM worker runs its engine in process when local).
MODEL_PROCESSES = frozenset({"embedding", "llm"})

MODEL_TUNING = {
    # libgomp: turns a thread spins after a parallel region before it sleeps (its default: 300,000).
    "GOMP_SPINCOUNT": "30000",
    # glibc: blocks below 32 MiB come from the heap instead of their own mapping, and freed space stays in
    # the process until 256 MiB of it lies at a heap's top, so a batch reuses what the last one freed.
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(256 * 1024 * 1024),
}


def model_tuning(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``MODEL_TUNING`` less the names ``environ`` (this process's environment by default) already sets."""
    environ = os.environ if environ is None else environ
    return {name: value for name, value in MODEL_TUNING.items() if name not in environ}


def rerun_with_model_tuning() -> None:
    """Start this program again with ``MODEL_TUNING`` in its environment, unless it is there already: for a
    benchmark whose own process runs a model beside the services it compares with."""
    missing = model_tuning()
    if missing:
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **missing})
