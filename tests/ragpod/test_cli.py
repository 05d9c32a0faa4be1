"""The ragpod command's own behaviour, without a gateway: where it points, what it refuses to send."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from ragpod import cli
from ragpod.documents import read_documents
from ragpod.processes import free_port
from ragpod.supervisor import ROOT, cli_example, converts_model


def test_help_shows_how_to_point_the_cli_at_a_gateway(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "--gateway URL" in out and "RAG_GATEWAY_URL" in out


def test_the_gateway_flag_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RAG_GATEWAY_URL", "http://127.0.0.1:1")
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["--gateway", nowhere, "ls"]) == 1
    assert f"cannot reach the gateway at {nowhere}" in capsys.readouterr().err


def test_ingest_refuses_a_text_file_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "good.md").write_text("# Fine\n\nText.\n")
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait".encode("latin-1"))
    assert cli.main(["--gateway", f"http://127.0.0.1:{free_port()}", "ingest", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "latin1.txt: not UTF-8 text (byte 3); nothing was indexed" in err
    assert "cannot reach" not in err  # refused before anything was sent


def test_the_demo_documents_carry_no_path_of_this_machine() -> None:
    documents = read_documents(ROOT / "demo" / "corpus")
    assert documents
    for document in documents:
        assert document["metadata"]["path"] == document["id"]
        assert str(ROOT) not in str(document["metadata"])


def test_the_banner_names_the_gateway_it_started_and_the_conversion_only_when_it_happens(tmp_path: Path) -> None:
    assert "--gateway http://127.0.0.1:9123 ask " in cli_example("http://127.0.0.1:9123")
    models = tmp_path / "models"
    assert converts_model(models)
    (models / "SmolLM2-135M-Instruct.Q4_1-1-2").mkdir(parents=True)
    assert converts_model(models)  # a copy cut short is no copy
    (models / "SmolLM2-135M-Instruct.Q4_1-1-2" / "config.json").write_text("{}")
    assert not converts_model(models)


def test_run_refuses_two_services_on_one_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    given = ["--port=embedding=9123", "--port=retriever=9123"]
    assert cli.main(["run", "--data-dir", str(tmp_path), *given]) == 1
    assert "embedding and retriever would both listen on 9123" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything started
    assert cli.main(["run", "--data-dir", str(tmp_path), "--port=gateway=8001"]) == 1  # the embedding's default
    assert "gateway and embedding would both listen on 8001" in capsys.readouterr().err


def test_free_ports_asked_for_one_after_another_differ() -> None:
    ports = [free_port() for _ in range(1000)]  # the kernel alone repeats one within a few hundred
    assert len(set(ports)) == len(ports)


@pytest.mark.parametrize(
    ("argv", "sent"),
    [
        (["--prefix", "docs/"], {"prefix": "docs/"}),
        (["--where", "team=web", "--where", "year=2024"], {"filter": {"team": "web", "year": 2024}}),
        (
            ["--prefix", "a/", "--where", "draft=true", "--where", 'n="1"'],
            {"prefix": "a/", "filter": {"draft": True, "n": "1"}},
        ),
    ],
)
def test_rm_deletes_in_bulk_by_prefix_or_metadata(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], sent: dict[str, object]
) -> None:
    seen: list[httpx.Request] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"deleted": 1000})

    monkeypatch.setattr(
        cli, "_client", lambda settings: httpx.Client(base_url="http://gw", transport=httpx.MockTransport(gateway))
    )
    assert cli.main(["rm", *argv]) == 0
    assert [(r.method, r.url.path, json.loads(r.content)) for r in seen] == [("POST", "/v1/documents/delete", sent)]
    assert capsys.readouterr().out == "deleted 1000 documents\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give the ids to delete, or --prefix/--where"),
        (["a.md", "--prefix", "docs/"], "give ids, or --prefix/--where, not both"),
        (["--where", "team"], "--where team: expected KEY=VALUE"),
    ],
)
def test_rm_refuses_an_empty_or_mixed_selection_before_sending(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    def gateway(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"nothing should be sent, got {request.method} {request.url}")

    monkeypatch.setattr(
        cli, "_client", lambda settings: httpx.Client(base_url="http://gw", transport=httpx.MockTransport(gateway))
    )
    assert cli.main(["rm", *argv]) == 1
    assert message in capsys.readouterr().err
