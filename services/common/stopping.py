"""A stop signal while a model loads ends the process at once.

Loading a model (importing torch, reading and converting weights) runs in a thread that cannot be
interrupted, and a process that waits for it before acting on SIGTERM keeps a rollout, a scale-down or a
Ctrl-C waiting just as long. Until the model has loaded there is nothing to drain: no request was
admitted and no job read. So a model's loading code runs inside :func:`loading`, and each entry point's
signal handler asks :func:`still_loading` first; when it is, :func:`end_now` ends the process by the
same signal, as if no handler had been installed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

import structlog

log = structlog.get_logger(__name__)

_loading: list[str] = []


@contextlib.contextmanager
def loading(what: str) -> Iterator[None]:
    """Marks the block as a model load (``what`` names it in the log) for :func:`still_loading`."""
    _loading.append(what)
    try:
        yield
    finally:
        _loading.remove(what)


def still_loading() -> bool:
    return bool(_loading)


def end_now(signum: int) -> None:
    """End this process by ``signum`` with its default action (for SIGTERM and SIGINT: terminate)."""
    log.warning("stopped_while_loading", signal=signal.Signals(signum).name, loading=list(_loading))
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
