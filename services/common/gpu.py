"""GPU utilisation and memory, sampled through NVML where a GPU is present.

Each NVML call is handled on its own: on a MIG device (and on some vGPU and
time-sliced setups) the utilisation call raises NotSupported while memory is
still readable, so a gauge that cannot be read is left out (its series is
removed, never left stale) and the others are still exported.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import structlog
from prometheus_client import Gauge

from services.common.metrics import GPU_MEMORY_TOTAL, GPU_MEMORY_USED, GPU_UTILIZATION

log = structlog.get_logger(__name__)

T = TypeVar("T")


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


class Sampler:
    """Reads every GPU's gauges; remembers which calls are unsupported so each is logged once."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self._unsupported: set[tuple[str, str]] = set()

    def _read(self, gpu: str, what: str, call: Callable[[], T]) -> T | None:
        try:
            value = call()
        except Exception as exc:
            if (gpu, what) not in self._unsupported:
                self._unsupported.add((gpu, what))
                log.info("gpu_metric_unavailable", gpu=gpu, metric=what, error=f"{type(exc).__name__}: {exc}")
            return None
        self._unsupported.discard((gpu, what))
        return value

    @staticmethod
    def _forget(gauge: Gauge, gpu: str) -> None:
        with contextlib.suppress(KeyError):
            gauge.remove(gpu)

    def sample_once(self) -> int:
        """Sets the GPU gauges that can be read; returns how many GPUs were reached."""
        nvml = self.nvml
        count: int | None = self._read("*", "count", nvml.nvmlDeviceGetCount)
        reached = 0
        for index in range(count or 0):
            gpu = str(index)
            handle = self._read(gpu, "handle", partial(nvml.nvmlDeviceGetHandleByIndex, index))
            if handle is None:
                continue
            reached += 1
            util = self._read(gpu, "utilization", partial(nvml.nvmlDeviceGetUtilizationRates, handle))
            if util is None:
                self._forget(GPU_UTILIZATION, gpu)
            else:
                GPU_UTILIZATION.labels(gpu).set(min(max(util.gpu / 100.0, 0.0), 1.0))
            memory = self._read(gpu, "memory", partial(nvml.nvmlDeviceGetMemoryInfo, handle))
            if memory is None:
                self._forget(GPU_MEMORY_USED, gpu)
                self._forget(GPU_MEMORY_TOTAL, gpu)
            else:
                GPU_MEMORY_USED.labels(gpu).set(memory.used)
                GPU_MEMORY_TOTAL.labels(gpu).set(memory.total)
        return reached


def sample_once(nvml: Any) -> int:
    """One sampling pass (see ``Sampler.sample_once``)."""
    return Sampler(nvml).sample_once()


async def sample_forever(interval: float = 5.0) -> None:
    """Runs for the life of a service on a GPU; returns at once where there is none."""
    nvml = _nvml()
    if nvml is None:
        return
    sampler = Sampler(nvml)
    try:
        while True:
            await asyncio.to_thread(sampler.sample_once)
            await asyncio.sleep(interval)
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
