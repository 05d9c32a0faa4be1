"""The ragpod command against the running stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import read_documents
from services.devstack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def ragpod(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAG_GATEWAY_URL": f"http://127.0.0.1:{stack.ports['gateway']}"}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_read_documents_takes_txt_and_md_with_stable_ids(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.md").write_text("# Title A\n\nBody of a.")
    (tmp_path / "sub" / "b.txt").write_text("Plain b.")
    (tmp_path / "c.pdf").write_text("not indexed")
    (tmp_path / "empty.md").write_text("  \n")
    docs = read_documents(tmp_path)
    assert [d["id"] for d in docs] == ["a.md", "sub/b.txt"]
    assert docs[0]["metadata"]["title"] == "Title A"


def test_ingest_then_ask(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "lighthouse.md").write_text(
        "# The Pellorin lighthouse\n\nThe Pellorin lighthouse on Skerrow Island has a green light that "
        "flashes every nine seconds."
    )
    ingest = ragpod(stack, "ingest", str(tmp_path))
    assert ingest.returncode == 0, ingest.stderr
    assert "indexed 1 documents, 1 chunks" in ingest.stdout
    assert "indexing: 100%" in ingest.stderr  # the progress bar
    asked = ragpod(stack, "ask", "What colour is the light of the Pellorin lighthouse?", "--top-k", "2")
    assert asked.returncode == 0, asked.stderr
    answer, _, rest = asked.stdout.partition("\nSources:\n")
    assert answer.strip()
    assert rest.lstrip().startswith("[1] lighthouse.md (chunk 0")
    assert "total" in rest


def test_cli_errors_are_clear(stack: Stack, tmp_path: Path) -> None:
    missing = ragpod(stack, "ingest", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "no such file or folder" in missing.stderr
    blank = ragpod(stack, "ask", "   ")
    assert blank.returncode == 1 and "error 422: validation_error: question:" in blank.stderr
