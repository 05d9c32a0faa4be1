"""The ragpod command against the running stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ragpod.documents import find_files, read_documents
from ragpod.supervisor import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def ragpod(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAG_GATEWAY_URL": f"http://127.0.0.1:{stack.ports['gateway']}"}
    return subprocess.run([sys.executable, "-m", "ragpod", *args], env=env, capture_output=True, text=True, timeout=300)


def listed(stack: Stack, *args: str) -> dict[str, str]:
    """``ragpod ls``: id -> the rest of its line."""
    ls = ragpod(stack, "ls", *args)
    assert ls.returncode == 0, ls.stderr
    lines = [line.split("\t", 1) for line in ls.stdout.splitlines()]
    assert f"{len(lines)} documents" in ls.stderr
    return {parts[0]: parts[1] for parts in lines}


def write_pdf(path: Path, title: str, text: str) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_title(title)
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    pdf.multi_cell(0, 8, text)
    pdf.output(str(path))


def write_docx(path: Path, heading: str, text: str) -> None:
    import docx

    document = docx.Document()
    document.add_heading(heading, level=1)
    document.add_paragraph(text)
    document.save(str(path))


def test_find_files_reads_text_files_and_hands_the_others_over_with_stable_ids(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.md").write_text("# Title A\n\nBody of a.")
    (tmp_path / "sub" / "b.txt").write_text("Plain b.")
    (tmp_path / "c.pdf").write_bytes(b"%PDF-1.4 parsed by the gateway")
    (tmp_path / "sub" / "d.docx").write_bytes(b"parsed by the gateway")
    (tmp_path / "e.html").write_text("<h1>E</h1>")
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / "empty.md").write_text("  \n")
    docs = read_documents(tmp_path)
    assert [d["id"] for d in docs] == ["a.md", "sub/b.txt"]
    assert docs[0]["metadata"]["title"] == "Title A"
    found = find_files(tmp_path)
    assert [(f.id, f.is_text) for f in found] == [
        ("a.md", True),
        ("c.pdf", False),
        ("e.html", False),
        ("empty.md", True),
        ("sub/b.txt", True),
        ("sub/d.docx", False),
    ]
    assert [f.id for f in find_files(tmp_path / "sub" / "d.docx")] == ["d.docx"]


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


def test_ingest_pdf_html_docx_then_list_and_remove(stack: Stack, tmp_path: Path) -> None:
    folder = tmp_path / "files"
    (folder / "sub").mkdir(parents=True)
    write_pdf(folder / "report.pdf", "Orchard report", "The Venlo orchard harvested 412 crates of quince in 2024.")
    (folder / "sub" / "page.html").write_text(
        "<html><head><title>Harbour notes</title></head><body><h1>Harbour</h1>"
        "<p>The Kesterwick harbour crane lifts 38 tonnes.</p></body></html>"
    )
    write_docx(folder / "memo.docx", "Canteen memo", "The canteen on deck four serves barley soup on Thursdays.")
    (folder / "readme.md").write_text("# Files folder\n\nThree files and this note.")

    ingest = ragpod(stack, "ingest", str(folder))
    assert ingest.returncode == 0, ingest.stderr
    assert "indexed 4 documents" in ingest.stdout
    assert "indexing: 100%" in ingest.stderr

    documents = listed(stack)
    assert documents["report.pdf"].startswith("1 chunks") and "Orchard report" in documents["report.pdf"]
    assert "Harbour notes" in documents["sub/page.html"]
    assert "Canteen memo" in documents["memo.docx"]
    assert "Files folder" in documents["readme.md"]
    # Page by page, the same documents.
    assert listed(stack, "--page-size", "1") == documents

    found = ragpod(stack, "ask", "How many crates of quince did the Venlo orchard harvest?", "--top-k", "1")
    assert found.returncode == 0, found.stderr
    assert "[1] report.pdf (chunk 0" in found.stdout

    removed = ragpod(stack, "rm", "report.pdf", "sub/page.html")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines() == ["deleted report.pdf", "deleted sub/page.html"]
    after = listed(stack)
    assert "report.pdf" not in after and "sub/page.html" not in after and "memo.docx" in after
    asked = ragpod(stack, "ask", "How many crates of quince did the Venlo orchard harvest?", "--top-k", "3")
    assert asked.returncode == 0, asked.stderr
    assert "report.pdf" not in asked.stdout.partition("\nSources:\n")[2]

    again = ragpod(stack, "rm", "report.pdf")
    assert again.returncode == 1
    assert "no document with id report.pdf" in again.stderr


def test_a_file_that_cannot_be_parsed_writes_nothing(stack: Stack, tmp_path: Path) -> None:
    write_pdf(tmp_path / "good.pdf", "Good", "The Ossory bell weighs nine hundred kilograms.")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a real PDF file")
    ingest = ragpod(stack, "ingest", str(tmp_path))
    assert ingest.returncode == 1
    assert "error 422" in ingest.stderr and "broken.pdf" in ingest.stderr
    documents = listed(stack)
    assert "good.pdf" not in documents and "broken.pdf" not in documents


def test_cli_errors_are_clear(stack: Stack, tmp_path: Path) -> None:
    missing = ragpod(stack, "ingest", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "no such file or folder" in missing.stderr
    (tmp_path / "data.json").write_text("{}")
    nothing = ragpod(stack, "ingest", str(tmp_path))
    assert nothing.returncode == 1 and "no files with text found" in nothing.stderr
    blank = ragpod(stack, "ask", "   ")
    assert blank.returncode == 1 and "error 422: validation_error: question:" in blank.stderr
    unknown = ragpod(stack, "rm", "never-indexed")
    assert unknown.returncode == 1 and "no document with id never-indexed" in unknown.stderr
    down = subprocess.run(
        [sys.executable, "-m", "ragpod", "ls"],
        env={**os.environ, "RAG_GATEWAY_URL": "http://127.0.0.1:9"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 1 and "cannot reach the gateway at http://127.0.0.1:9" in down.stderr


def test_a_reader_that_stops_early_ends_the_command_quietly() -> None:
    """`ragpod ls | head -1`: the closed pipe ends the command with 141 and no traceback."""
    script = (
        "import ragpod.cli as cli\n"
        "cli.cmd_ls = lambda args, client: [print(f'document-{i}') for i in range(200_000)]\n"
        "raise SystemExit(cli.main(['ls']))\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[2]
    )
    assert writer.stdout is not None and writer.stderr is not None
    first = writer.stdout.readline()
    writer.stdout.close()  # what `head -1` does after its line
    code = writer.wait(timeout=120)
    errors = writer.stderr.read().decode()
    assert first == b"document-0\n"
    assert code == 141, errors
    assert "Traceback" not in errors and "BrokenPipe" not in errors, errors
