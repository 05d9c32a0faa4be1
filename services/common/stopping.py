"""A stop signal while a model loads ends the process at once.

Loading a model (importing torch, reading and converting weights) runs in a thread that cannot be
interrupted, and may hold the interpreter for long stretches, so a Python signal handler could run only
once it had finished, keeping a rollout, a scale-down or a Ctrl-C waiting just as long. Until the model
has loaded there is nothing to drain: no request was admitted and no job read. So a service's entry point
calls :func:`enable`, its model loads inside :func:`loading`, and for that time SIGTERM and SIGINT have
their default action (the kernel ends the process); the service's own handlers are back once it has
loaded. Without :func:`enable` (tests, benchmarks, many apps in one process) :func:`loading` changes
nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import structlog

log = structlog.get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_enabled = False
_depth = 0
_saved: dict[int, Any] = {}


def enable() -> None:
    """From a service's entry point: a stop signal during :func:`loading` ends this process."""
    global _enabled
    _enabled = True


@contextlib.contextmanager
def loading(what: str) -> Iterator[None]:
    """A model load (``what`` names it in the log); loads may nest or overlap."""
    global _depth
    switch = _enabled and threading.current_thread() is threading.main_thread()
    if switch:
        if _depth == 0:
            _saved.update({sig: signal.signal(sig, signal.SIG_DFL) for sig in STOP_SIGNALS})
            log.info("model_loading", what=what, stop_signals="end the process")
        _depth += 1
    try:
        yield
    finally:
        if switch:
            _depth -= 1
            if _depth == 0:
                for sig, handler in _saved.items():
                    signal.signal(sig, handler)
                _saved.clear()
