from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.fixtures.redis", "tests.fixtures.models", "tests.fixtures.llm", "tests.fixtures.tracing"]


# End-to-end modules that start their own processes instead of the folder's shared stack.
OWN_STACK = {"test_run.py", "test_tracing.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadgroup``), each module runs on one worker, so a module's fixtures start
    once; the end-to-end tests that share one stack of processes (tests/e2e/conftest.py) go to one worker."""
    for item in items:
        parts = item.path.relative_to(ROOT).parts
        shared_stack = parts[:2] == ("tests", "e2e") and parts[-1] not in OWN_STACK
        item.add_marker(pytest.mark.xdist_group("e2e" if shared_stack else "/".join(parts)))
