"""The heap of a process, frozen once its start is done.

``freeze_heap`` is called once per process, at the point where it holds what
it keeps for its life (a model, the libraries around it, its store): one
collection, then every object alive is moved out of the cyclic garbage
collector's reach (``gc.freeze``). Those objects are never garbage, but every
full collection would walk all of them, with the event loop and every request
stopped meanwhile. Objects made afterwards are collected as before; a frozen
one that is later dropped is still freed by its reference count, only a
reference cycle among frozen objects stays.

How the allocator keeps the memory a model's batches free is not set here: it
is glibc's own environment (``MALLOC_*``), set by the images, the manifests and
the local supervisor (docs/tuning.md).
"""

from __future__ import annotations

import gc


def freeze_heap() -> int:
    """Collect once, then leave every object alive now out of every later collection; how many are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
