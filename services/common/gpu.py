"""GPU utilisation and memory, sampled through NVML where a GPU is present."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from services.common.metrics import GPU_MEMORY_TOTAL, GPU_MEMORY_USED, GPU_UTILIZATION

log = structlog.get_logger(__name__)


def _nvml() -> Any | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU: nothing to sample
        return None
    return pynvml


def sample_once(nvml: Any) -> int:
    """Sets the GPU gauges from NVML; returns how many GPUs were read."""
    count = int(nvml.nvmlDeviceGetCount())
    for index in range(count):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        util = nvml.nvmlDeviceGetUtilizationRates(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        gpu = str(index)
        GPU_UTILIZATION.labels(gpu).set(util.gpu / 100.0)
        GPU_MEMORY_USED.labels(gpu).set(memory.used)
        GPU_MEMORY_TOTAL.labels(gpu).set(memory.total)
    return count


async def sample_forever(interval: float = 5.0) -> None:
    """Runs for the life of a service on a GPU; returns at once where there is none."""
    nvml = _nvml()
    if nvml is None:
        return
    try:
        while True:
            try:
                await asyncio.to_thread(sample_once, nvml)
            except Exception as exc:
                log.warning("gpu_sample_failed", error=str(exc))
            await asyncio.sleep(interval)
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
