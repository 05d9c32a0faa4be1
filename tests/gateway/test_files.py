"""POST /v1/files: .pdf, .html, .docx, .md and .txt parsed in the gateway and indexed by a real retriever."""

from __future__ import annotations

import asyncio
import io
import time
import zipfile
import zlib
from collections.abc import AsyncIterator

import docx
import httpx
import pytest
from fpdf import FPDF
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.app import create_app
from services.gateway.config import Settings
from services.gateway.files import ParseLimits, TooComplex, Unparseable, parse_file
from tests.fixtures.apps import in_process
from tests.fixtures.gateway_stack import Stack, stack
from tests.fixtures.redis import RedisServer
from tests.gateway.conftest import RetrieverDouble

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


def many_paragraphs_docx(count: int) -> bytes:
    """A valid .docx of ``count`` one-letter paragraphs (about 38 kB for 20,000)."""
    document = docx.Document()
    for _ in range(count):
        document.add_paragraph("x")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def zip_bomb_docx(unpacked_bytes: int) -> bytes:
    """A .docx whose document part unpacks to ``unpacked_bytes`` of XML, a few kilobytes on the wire per MB."""
    template = zipfile.ZipFile(io.BytesIO(make_docx("Bomb", "Body.")))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as bomb:
        for member in template.infolist():
            if member.filename != "word/document.xml":
                bomb.writestr(member, template.read(member))
        with bomb.open("word/document.xml", "w") as part:
            part.write(
                b'<?xml version="1.0"?><w:document xmlns:w="http://schemas.openxmlformats.org/'
                b'wordprocessingml/2006/main"><w:body>'
            )
            paragraph = b"<w:p><w:r><w:t>x</w:t></w:r></w:p>" * 1024
            for _ in range(unpacked_bytes // len(paragraph) + 1):
                part.write(paragraph)
            part.write(b"</w:body></w:document>")
    return out.getvalue()


def busy_pdf(operations: int) -> bytes:
    """A one-page PDF whose content stream holds ``operations`` text-showing operations, deflated."""
    content = zlib.compress(b"BT /F1 12 Tf 72 720 Td " + b"(a) Tj " * operations + b"ET")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> "
        b"/Contents 4 0 R >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_what_a_file_may_expand_to_is_bounded_before_it_is_parsed() -> None:
    limits = ParseLimits(max_unpacked_bytes=1024 * 1024, max_paragraphs=1000, max_pages=2, max_content_bytes=10_000)
    with pytest.raises(
        TooComplex, match=r"unpacks to \d+ bytes, over the limit of 1048576 \(RAG_FILE_MAX_UNPACKED_BYTES\)"
    ):
        parse_file("bomb.docx", zip_bomb_docx(4 * 1024 * 1024), limits)
    with pytest.raises(TooComplex, match=r"has 2000 paragraphs and table rows, .*\(RAG_FILE_MAX_PARAGRAPHS\)"):
        parse_file("many.docx", many_paragraphs_docx(2000), limits)
    with pytest.raises(TooComplex, match=r"has 3 pages, over the limit of 2 \(RAG_FILE_MAX_PAGES\)"):
        parse_file("long.pdf", make_pdf("one", "two", "three"), limits)
    with pytest.raises(TooComplex, match=r"more than 10000 bytes \(RAG_FILE_MAX_CONTENT_BYTES\)"):
        parse_file("busy.pdf", busy_pdf(5000), limits)
    assert parse_file("busy.pdf", busy_pdf(50), ParseLimits()).text == "a" * 50
    # Under the limits, the title still comes from the first heading; the default style's name is looked up once.
    assert parse_file("x.docx", make_docx("Heading one", *["Body."] * 500), limits).title == "Heading one"


class BodiesRead:
    """Middleware for a test: sets ``done`` once ``count`` request bodies to /v1/files have been read whole."""

    def __init__(self, app: ASGIApp, count: int, done: asyncio.Event) -> None:
        self.app, self.count, self.done = app, count, done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/files":
            await self.app(scope, receive, send)
            return

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                self.count -= 1
                if self.count == 0:
                    self.done.set()
            return message

        await self.app(scope, counted, send)


async def test_files_are_parsed_in_another_process_and_a_zip_bomb_is_refused_naming_its_limit(
    redis_server: RedisServer,
) -> None:
    retriever = RetrieverDouble()
    indexed_at: list[float] = []

    def recording(request: httpx.Request) -> httpx.Response:
        indexed_at.append(time.monotonic())  # the parse of the files of that request has ended
        return retriever(request)

    settings = Settings(redis_url=redis_server.url, file_max_unpacked_bytes=16 * 1024 * 1024)
    app = create_app(settings, retriever_transport=httpx.MockTransport(recording))
    bodies_read = asyncio.Event()
    app.add_middleware(BodiesRead, count=2, done=bodies_read)
    refused_at: list[float] = []
    async with in_process(app) as client:

        async def upload(name: str, data: bytes) -> httpx.Response:
            response = await client.post("/v1/files", files={"files": (name, data)})
            if response.status_code != 200:
                refused_at.append(time.monotonic())
            return response

        many = asyncio.create_task(upload("many.docx", many_paragraphs_docx(20_000)))
        bomb = asyncio.create_task(upload("bomb.docx", zip_bomb_docx(64 * 1024 * 1024)))
        await bodies_read.wait()  # both bodies are in: each request goes on to parse its file
        health = await client.get("/healthz")
        healthy_at = time.monotonic()
        many_response, bomb_response = await asyncio.gather(many, bomb)
    assert health.status_code == 200
    assert many_response.status_code == 200, many_response.text
    assert many_response.json()["files"][0]["chars"] == 3 * 20_000 - 2  # "x" paragraphs, a blank line between two
    assert bomb_response.status_code == 422
    body = bomb_response.json()
    assert body["error"] == "file_too_complex"
    assert body["detail"].startswith("files.0 (bomb.docx): too complex to parse: unpacks to ")
    assert "(RAG_FILE_MAX_UNPACKED_BYTES)" in body["detail"]
    assert healthy_at < min(indexed_at + refused_at)  # answered while both files were still being parsed


async def test_a_file_over_the_time_limit_is_refused_and_the_next_one_parses(redis_server: RedisServer) -> None:
    settings = Settings(redis_url=redis_server.url, file_parse_timeout_seconds=1.0)
    app = create_app(settings, retriever_transport=httpx.MockTransport(RetrieverDouble()))
    async with in_process(app) as client:
        slow = await client.post("/v1/files", files={"files": ("busy.pdf", busy_pdf(200_000))})
        after = await client.post("/v1/files", files={"files": ("ok.txt", b"Still parsing.")})
    assert slow.status_code == 422, slow.text
    assert slow.json()["error"] == "file_too_complex"
    assert "parsing took longer than 1 s (RAG_FILE_PARSE_TIMEOUT_SECONDS)" in slow.json()["detail"]
    assert after.status_code == 200, after.text
