"""How long torch's OpenMP threads spin once a batch is done, in a process whose event loop needs the cores.

torch runs its CPU operations on an OpenMP team (GNU libgomp). Between two
parallel regions a team's threads spin before they sleep: 300,000 turns by
default (``GOMP_SPINCOUNT``), 3 to 5 ms on the 2-core machine the figures
below come from. Inside a forward pass that keeps them ready for the next
operation. After the last one of a batch it keeps a core busy for nothing
just when the service needs it: its event loop answers the batch's callers
and reads their next requests, and the model waits for them.

``spin_briefly`` sets ``GOMP_SPINCOUNT`` to 30,000 turns (about 0.4 ms
there), longer than the gaps between two operations of a forward pass, for
the process it runs in; libgomp reads it once, when torch is first
imported, so it must come before that. Measured on the embedding service
(2 cores, 32 clients, one text each): the model's idle time between two
batches 4.0 ms with the default, 2.9-3.1 ms with 30,000 (2.8-3.0 with 10,000
or 20,000), its time per batch unchanged (55-59 ms either way). The LLM
worker and the model server set it too: the worker's threads spinning after
a forward pass had slowed the embedding service beside it
(docs/architecture.md). A value in
the environment (``GOMP_SPINCOUNT``, or ``OMP_WAIT_POLICY``, which sets it
too) is left as it is.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "30000"
ENVIRONMENT = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def spin_briefly() -> bool:
    """Set ``GOMP_SPINCOUNT`` for this process; True when set, False when the environment already says, or
    when torch is already imported (too late: libgomp has read its environment)."""
    if any(name in os.environ for name in ENVIRONMENT) or "torch" in sys.modules:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
