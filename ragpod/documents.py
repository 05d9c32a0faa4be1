"""What ``ragpod ingest`` sends: text files as JSON documents, other formats as files the gateway parses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = {".txt", ".md"}
# Parsed by the gateway's POST /v1/files.
FILE_SUFFIXES = {".pdf", ".html", ".htm", ".docx"}
SUFFIXES = TEXT_SUFFIXES | FILE_SUFFIXES


@dataclass(frozen=True)
class Found:
    """A file to index; its id is its path relative to the folder given (stable across runs)."""

    id: str
    path: Path

    @property
    def is_text(self) -> bool:
        return self.path.suffix.lower() in TEXT_SUFFIXES


def find_files(*paths: Path, suffixes: set[str] = SUFFIXES) -> list[Found]:
    """Every file with one of ``suffixes`` under ``paths`` (folders are walked), in a stable order."""
    found = []
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if path.suffix.lower() in suffixes:
                found.append(Found(path.name if root.is_file() else path.relative_to(root).as_posix(), path))
    return found


class NotText(ValueError):
    """A .txt/.md file that is not UTF-8 text; the message names it (``POST /v1/files`` refuses it alike)."""


def as_document(found: Found) -> dict[str, Any] | None:
    """A .txt/.md file as a /v1/documents entry, titled by its first line; None when it has no text.

    Its metadata names it by its path relative to the folder given (its id), never by where it lies on this
    machine. Raises ``NotText`` for a file that is not UTF-8."""
    try:
        text = found.path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise NotText(f"{found.path}: not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        return None
    title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.strip()), found.path.stem)
    return {"id": found.id, "text": text, "metadata": {"path": found.id, "title": title[:200]}}


def read_documents(*paths: Path) -> list[dict[str, Any]]:
    """One document per .txt/.md file with text under ``paths``."""
    documents = (as_document(found) for found in find_files(*paths, suffixes=TEXT_SUFFIXES))
    return [document for document in documents if document is not None]
