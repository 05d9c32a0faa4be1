"""POST /v1/files: .pdf, .html, .docx, .md and .txt parsed in the gateway and indexed by a real retriever."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import docx
import pytest
from fpdf import FPDF

from services.gateway.files import Unparseable, parse_file
from tests.fixtures.gateway_stack import Stack, stack

__all__ = ["stack"]


def make_pdf(*pages: str, title: str = "") -> bytes:
    pdf = FPDF()
    if title:
        pdf.set_title(title)
    pdf.set_font("helvetica", size=11)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


def make_docx(heading: str, *paragraphs: str, title: str = "") -> bytes:
    document = docx.Document()
    if title:
        document.core_properties.title = title
    document.add_heading(heading, level=1)
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


HTML = b"""<!doctype html><html><head><title>Office guide</title><style>p{color:red}</style></head>
<body><nav>Home | About</nav><h1>Parking</h1><p>Visitors park in <b>level 2</b> of the garage.</p>
<script>var secret = "never indexed";</script></body></html>"""


async def ids(stack: Stack) -> set[str]:
    return {d["id"] for d in (await stack.gateway.get("/v1/documents")).json()["documents"]}


async def test_every_supported_format_is_indexed_with_its_title(stack: Stack) -> None:
    files = [
        ("files", ("manual.pdf", make_pdf("The Zorblax was first sold in 1987.", title="Zorblax manual"))),
        ("files", ("guide.html", HTML)),
        ("files", ("report.docx", make_docx("Quarterly report", "Revenue grew by 12 percent."))),
        ("files", ("notes/readme.md", b"Intro line\n\n# Release notes\n\nVersion 2 adds dark mode.\n")),
        ("files", ("plain.txt", b"Lunch is served at noon.\n")),
    ]
    response = await stack.gateway.post("/v1/files", files=files, data={"metadata": '{"source": "upload"}'})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["indexed"] == 5 and body["chunks"] == 5
    titles = {f["id"]: (f["title"], f["format"]) for f in body["files"]}
    assert titles == {
        "manual.pdf": ("Zorblax manual", "pdf"),
        "guide.html": ("Office guide", "html"),
        "report.docx": ("Quarterly report", "docx"),
        "notes/readme.md": ("Release notes", "markdown"),
        "plain.txt": ("plain", "text"),
    }
    doc = (await stack.gateway.get("/v1/documents/notes/readme.md")).json()
    assert doc["metadata"] == {
        "source": "upload",
        "title": "Release notes",
        "filename": "notes/readme.md",
        "format": "markdown",
    }
    hits = (await stack.gateway.post("/v1/search", json={"question": "Where do visitors park?", "top_k": 1})).json()
    assert hits["sources"][0]["document_id"] == "guide.html"
    assert "level 2" in hits["sources"][0]["text"] and "never indexed" not in hits["sources"][0]["text"]


async def test_the_id_field_names_the_files(stack: Stack) -> None:
    files = [("files", ("a.txt", b"alpha")), ("files", ("b.txt", b"beta"))]
    response = await stack.gateway.post("/v1/files", files=files, data={"id": ["docs/first", "docs/second"]})
    assert response.status_code == 200, response.text
    assert await ids(stack) == {"docs/first", "docs/second"}


async def test_re_ingesting_a_changed_pdf_replaces_its_chunks(stack: Stack) -> None:
    old_pages = [f"Old chapter {i}: the warranty of model Q{i} lasts {i + 1} years. " * 6 for i in range(4)]
    first = await stack.gateway.post("/v1/files", files={"files": ("policy.pdf", make_pdf(*old_pages))})
    assert first.status_code == 200, first.text
    old_chunks = first.json()["chunks"]
    assert old_chunks >= 4
    new_pdf = make_pdf("New policy: every product now has a lifetime warranty, no questions asked.")
    second = await stack.gateway.post("/v1/files", files={"files": ("policy.pdf", new_pdf)})
    assert second.status_code == 200, second.text
    assert second.json()["chunks"] == 1
    assert (await stack.gateway.get("/v1/documents/policy.pdf")).json()["chunks"] == 1
    hits = await stack.gateway.post("/v1/search", json={"question": "How long is the warranty of Q2?", "top_k": 5})
    texts = [s["text"] for s in hits.json()["sources"]]
    assert texts and all("Old chapter" not in t for t in texts)
    assert any("lifetime warranty" in t for t in texts)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("broken.pdf", b"%PDF-1.4 this is not really a pdf", "not a readable PDF"),
        ("broken.docx", b"PK\x03\x04 not a zip", "not a readable .docx"),
        ("scan.pdf", None, "no text layer"),
        ("binary.txt", b"\xff\xfe\xfa", "not UTF-8"),
        ("program.exe", b"MZ", "unsupported file type '.exe'"),
        ("empty.md", b"   \n", "empty"),
    ],
)
async def test_an_unparseable_file_is_a_422_naming_it_and_nothing_is_written(
    stack: Stack, name: str, content: bytes | None, reason: str
) -> None:
    if content is None:  # a PDF with a page and no text on it
        pdf = FPDF()
        pdf.add_page()
        content = bytes(pdf.output())
    files = [("files", ("good.txt", b"A perfectly good file.")), ("files", (name, content))]
    response = await stack.gateway.post("/v1/files", files=files)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "validation_error"
    assert body["detail"].startswith(f"files.1 ({name}): cannot be parsed: ") and reason in body["detail"]
    assert [r for r in stack.to_retriever if r.method == "POST"] == []
    assert await ids(stack) == set()


async def test_a_body_over_the_limit_is_a_413_and_nothing_is_written(stack: Stack) -> None:
    big = b"word " * 20_000  # 100 kB against a 64 kB limit
    response = await stack.gateway.post("/v1/files", files={"files": ("big.txt", big)})
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large" and "bytes" in response.json()["detail"]

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit is found while reading
        for _ in range(20):
            yield b'{"documents": [{"id": "x", "text": "' + b"y" * 5000 + b'"}]}'

    response = await stack.gateway.post(
        "/v1/documents", content=chunked(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert stack.to_retriever == [] and await ids(stack) == set()


async def test_files_need_a_name_or_an_id(stack: Stack) -> None:
    mismatched = await stack.gateway.post("/v1/files", files={"files": ("a.txt", b"alpha")}, data={"id": ["x", "y"]})
    assert mismatched.status_code == 422 and mismatched.json()["detail"].startswith("id: 2 ids given for 1 files")
    twice = await stack.gateway.post("/v1/files", files=[("files", ("a.txt", b"1")), ("files", ("a.txt", b"2"))])
    assert twice.status_code == 422 and "appears more than once" in twice.json()["detail"]
    missing = await stack.gateway.post("/v1/files", data={"id": "x"})
    assert missing.status_code == 422 and missing.json()["detail"].startswith("files")
    bad_meta = await stack.gateway.post("/v1/files", files={"files": ("a.txt", b"1")}, data={"metadata": "[1]"})
    assert bad_meta.status_code == 422 and bad_meta.json()["detail"] == "metadata: must be a JSON object"
    assert await ids(stack) == set()


def test_the_parsers_take_titles_from_metadata_then_headings() -> None:
    assert parse_file("x.pdf", make_pdf("Body text.", title="From metadata")).title == "From metadata"
    assert parse_file("x.pdf", make_pdf("First line\nsecond line")).title == "First line"
    assert parse_file("x.docx", make_docx("Heading one", "Body.", title="Core title")).title == "Core title"
    assert parse_file("x.docx", make_docx("Heading one", "Body.")).title == "Heading one"
    assert parse_file("page.html", b"<h2>Only a heading</h2><p>text</p>").title == "Only a heading"
    assert parse_file("page.html", b"<p>no heading</p>").title == "page"
    html = parse_file("p.htm", b"<p>Hello <b>bold</b> world</p><ul><li>one</li><li>two</li></ul>")
    assert html.text == "Hello bold world\n\none\n\ntwo"
    with pytest.raises(Unparseable, match="unsupported"):
        parse_file("noextension", b"text")
