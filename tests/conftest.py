from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.fixtures.redis", "tests.fixtures.models", "tests.fixtures.llm"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadgroup``), each module runs on one worker, so a module's fixtures start
    once; the end-to-end tests share one stack of processes, so their whole folder goes to one worker."""
    for item in items:
        parts = item.path.relative_to(ROOT).parts
        item.add_marker(pytest.mark.xdist_group("e2e" if parts[:2] == ("tests", "e2e") else "/".join(parts)))
