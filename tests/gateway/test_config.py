"""The gateway's settings at start: an API that must be closed does not start open."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from ragpod.processes import free_port
from services.gateway.config import Settings


@pytest.mark.parametrize("keys", ["", " ", ",", " , "])
def test_required_keys_missing_are_refused_naming_both_variables(monkeypatch: pytest.MonkeyPatch, keys: str) -> None:
    monkeypatch.setenv("RAG_REQUIRE_API_KEYS", "true")
    monkeypatch.setenv("RAG_API_KEYS", keys)
    with pytest.raises(ValidationError, match="RAG_REQUIRE_API_KEYS is true but RAG_API_KEYS holds no key"):
        Settings()


def test_required_keys_present_or_not_required_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAG_API_KEYS", raising=False)
    monkeypatch.delenv("RAG_REQUIRE_API_KEYS", raising=False)
    assert Settings().require_api_keys is False  # make run and tests stay open by default
    monkeypatch.setenv("RAG_REQUIRE_API_KEYS", "true")
    monkeypatch.setenv("RAG_API_KEYS", "a-key")
    assert Settings().api_keys == "a-key"


def test_the_gateway_stops_at_start_when_keys_are_required_and_absent() -> None:
    env = {**os.environ, "RAG_REQUIRE_API_KEYS": "true", "RAG_API_KEYS": "", "RAG_PORT": str(free_port())}
    done = subprocess.run(
        [sys.executable, "-m", "services.gateway"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode != 0
    assert "RAG_REQUIRE_API_KEYS is true but RAG_API_KEYS holds no key" in done.stderr
    assert "Traceback" not in done.stderr or "ValidationError" in done.stderr
