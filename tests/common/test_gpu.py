"""NVML sampling: each call on its own, so what a device supports is exported even where another call fails.

NVML is replaced by a stand-in shaped like ``pynvml`` that raises the real
``pynvml`` errors, as a MIG device does for utilisation (tests/gpu/ reads a
real one where a GPU is present).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml
from prometheus_client import REGISTRY

from services.common.gpu import Sampler

GIB = 1024**3


class FakeNvml:
    """Two GPUs; ``unsupported`` names calls that raise NVMLError_NotSupported, ``failing`` ones that raise Unknown."""

    def __init__(self, unsupported: set[str] = frozenset(), failing: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.unsupported = unsupported
        self.failing = failing

    def _check(self, call: str) -> None:
        if call in self.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if call in self.failing:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)

    def nvmlDeviceGetCount(self) -> int:
        self._check("count")
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._check(f"handle{index}")
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        self._check("utilization")
        return SimpleNamespace(gpu=40 + handle, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        self._check("memory")
        return SimpleNamespace(used=(handle + 1) * GIB, total=80 * GIB, free=0)


def sample(name: str, gpu: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"gpu": gpu})


def test_every_gauge_where_every_call_works() -> None:
    assert Sampler(FakeNvml()).sample_once() == 2
    for gpu in ("0", "1"):
        assert sample("rag_gpu_utilization_ratio", gpu) == (40 + int(gpu)) / 100
        assert sample("rag_gpu_memory_used_bytes", gpu) == (int(gpu) + 1) * GIB
        assert sample("rag_gpu_memory_total_bytes", gpu) == 80 * GIB


def test_mig_utilisation_not_supported_still_exports_memory() -> None:
    Sampler(FakeNvml()).sample_once()  # a reading from before, which must not stay behind
    sampler = Sampler(FakeNvml(unsupported={"utilization"}))
    assert sampler.sample_once() == 2
    for gpu in ("0", "1"):
        assert sample("rag_gpu_utilization_ratio", gpu) is None
        assert sample("rag_gpu_memory_used_bytes", gpu) == (int(gpu) + 1) * GIB
        assert sample("rag_gpu_memory_total_bytes", gpu) == 80 * GIB


def test_a_failing_device_does_not_hide_the_other() -> None:
    Sampler(FakeNvml()).sample_once()
    assert Sampler(FakeNvml(failing={"handle0"})).sample_once() == 1
    assert sample("rag_gpu_memory_used_bytes", "1") == 2 * GIB
    assert sample("rag_gpu_utilization_ratio", "1") == 0.41


def test_memory_unreadable_still_exports_utilisation() -> None:
    Sampler(FakeNvml()).sample_once()
    assert Sampler(FakeNvml(failing={"memory"})).sample_once() == 2
    assert sample("rag_gpu_memory_used_bytes", "0") is None
    assert sample("rag_gpu_memory_total_bytes", "0") is None
    assert sample("rag_gpu_utilization_ratio", "0") == 0.40


def test_no_count_reads_nothing_and_raises_nothing() -> None:
    assert Sampler(FakeNvml(failing={"count"})).sample_once() == 0
