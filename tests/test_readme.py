"""The README documents every setting the services read."""

from __future__ import annotations

import importlib
import re
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


def test_every_ragpod_command_in_the_readme_exists() -> None:
    from ragpod.cli import parser

    readme = (ROOT / "README.md").read_text()
    used = set(re.findall(r"(?:bin/|`)ragpod (\w+)", readme))
    choices = next(a for a in parser()._actions if a.dest == "command").choices  # argparse keeps subcommands here
    assert choices is not None
    assert used and used <= set(choices), used - set(choices)
    for option in re.findall(r"ragpod run[^\n`]*?(--[\w-]+)", readme):
        assert option in parser().format_help() or option in choices["run"].format_help(), option


def test_every_path_in_the_layout_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    paths = [line.split()[0] for line in block.splitlines() if line.strip()]
    missing = [p for p in paths if "<" not in p and not (ROOT / p).exists()]
    assert paths and missing == []
