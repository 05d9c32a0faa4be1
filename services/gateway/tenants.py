"""Who a key belongs to and what it may do: the keys file (``RAG_API_KEYS_FILE``).

The file is a YAML list; each entry names one key, plain (``key``) or as its SHA-256 digest (``sha256``, 64
hexadecimal digits, with or without the ``sha256:`` mark), the tenant it belongs to, and its scopes:

    - sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
      tenant: team-a
      scopes: [read, write]
    - key: a-read-only-key-of-team-b
      tenant: team-b
      scopes: [read]

``read`` is asking, searching, chatting and listing or reading documents; ``write`` is ingesting documents or
files and deleting them. The keys of ``RAG_API_KEYS`` are the ``default`` tenant's, with both scopes. The
file is read once, at start; a file that cannot be read or holds a bad entry stops the gateway naming the
variable, the entry and the field.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.common.tenants import DEFAULT_TENANT, TENANT_HEADER, TENANT_PATTERN

__all__ = [
    "BOTH",
    "DEFAULT_TENANT",
    "TENANT_HEADER",
    "Caller",
    "KeyEntry",
    "Scope",
    "digest_from_hex",
    "read_keys_file",
]

DIGEST_PREFIX = "sha256:"
Scope = Literal["read", "write"]
BOTH: frozenset[Scope] = frozenset({"read", "write"})


def digest_from_hex(value: str) -> bytes | None:
    """A SHA-256 digest written as 64 hexadecimal digits, after ``sha256:`` or not; None if it is not one."""
    value = value.strip()
    if value.lower().startswith(DIGEST_PREFIX):
        value = value[len(DIGEST_PREFIX) :]
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return None
    return raw if len(raw) == 32 else None


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller of one request: its tenant, its scopes and a name for logs and rate limits
    (a digest prefix of its key, or its address without keys); never the key itself."""

    tenant: str
    scopes: frozenset[Scope]
    identity: str


@dataclass(frozen=True, slots=True)
class KeyEntry:
    digest: bytes
    tenant: str
    scopes: frozenset[Scope]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(None, min_length=1)
    sha256: str | None = None
    tenant: str = Field(..., pattern=TENANT_PATTERN)
    scopes: list[Scope] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _one_key(self) -> _Entry:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key and sha256")
        if self.key is not None and not self.key.strip():
            raise ValueError("key: must not be blank")
        return self

    def digest(self) -> bytes:
        if self.key is not None:
            return hashlib.sha256(self.key.strip().encode("utf-8")).digest()
        raw = digest_from_hex(str(self.sha256))
        if raw is None:
            raise ValueError("sha256: must be 64 hexadecimal digits (optionally after sha256:)")
        return raw


def read_keys_file(path: str | Path) -> list[KeyEntry]:
    """The entries of the keys file; ValueError naming ``RAG_API_KEYS_FILE``, the entry and the field."""
    where = f"RAG_API_KEYS_FILE={path}"
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: not valid YAML: {exc}") from None
    if loaded is None:
        loaded = []
    if not isinstance(loaded, list):
        raise ValueError(f"{where}: must be a list of entries {{key | sha256, tenant, scopes}}")
    entries: list[KeyEntry] = []
    seen: dict[bytes, int] = {}
    for index, item in enumerate(loaded):
        try:
            entry = _Entry.model_validate(item)
            digest = entry.digest()
        except ValidationError as exc:
            first = exc.errors()[0]
            message = str(first["msg"]).removeprefix("Value error, ")
            field = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{where}: entry {index}: {field + ': ' if field else ''}{message}") from None
        except ValueError as exc:
            raise ValueError(f"{where}: entry {index}: {exc}") from None
        if digest in seen:
            raise ValueError(f"{where}: entry {index}: the same key as entry {seen[digest]}")
        seen[digest] = index
        entries.append(KeyEntry(digest, entry.tenant, frozenset(entry.scopes)))
    return entries
