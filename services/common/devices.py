"""Where a model runs: one choice of device for every model, and how to tell its out-of-memory errors.

torch is imported only inside the functions: services that run no model never
load it by importing this module.
"""

from __future__ import annotations

from typing import Literal

DeviceChoice = Literal["auto", "cpu", "cuda"]


class DeviceUnavailable(ValueError):
    """The configured device is not present (raised at start, naming the variable)."""


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def choose_device(wanted: str, variable: str) -> str:
    """``cuda`` where asked for or where ``auto`` finds a CUDA device, else ``cpu``.

    ``variable`` names the setting in the error when CUDA is asked for and absent.
    """
    if wanted not in ("auto", "cpu", "cuda"):
        raise DeviceUnavailable(f"{variable}={wanted!r}: must be auto, cpu or cuda")
    if wanted == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if wanted == "cuda":
        raise DeviceUnavailable(f"{variable}=cuda but no CUDA device is available")
    return "cpu"


def is_out_of_memory(exc: BaseException) -> bool:
    """A device (or host) allocation failed: the same work may succeed smaller, later or elsewhere."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover - every model service has torch
        return False
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def release_cached_memory(device: str) -> None:
    """Hands the allocator's cached blocks back after an out-of-memory error, so the next try has them."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
