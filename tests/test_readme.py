"""The README documents every setting the services read."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("service", ["gateway", "embedding", "retriever", "llm"])
def test_every_setting_is_in_the_readme(service: str) -> None:
    readme = (ROOT / "README.md").read_text()
    settings = importlib.import_module(f"services.{service}.config").Settings
    missing = [f"RAG_{name.upper()}" for name in settings.model_fields if f"`RAG_{name.upper()}`" not in readme]
    assert missing == []


def test_the_readme_names_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run", "test"):
        assert f"make {target}" in readme
        assert f"\n{target}:" in makefile
