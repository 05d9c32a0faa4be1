"""Uploaded files to plain text and a title: .pdf, .html, .docx, .md and .txt.

Parsing happens in the gateway, before anything is sent to the retriever, so a request whose files
cannot all be read writes nothing. The libraries are pure Python (pypdf, BeautifulSoup, python-docx):
the gateway image stays free of torch and of native parsers.

A small file can still be a lot of work (a .docx that unpacks to hundreds of megabytes of XML, a PDF of
a few kilobytes with hundreds of thousands of text operations), so ``FileParser`` parses each file in a
worker process (pebble's ``ProcessPool``), never on the event loop: the process is stopped when the file
takes longer than its time limit, and it cannot grow past its memory limit. Before the work starts, what
a file may expand to is bounded (``ParseLimits``). A file over any limit is ``TooComplex``, naming the
limit, which the API answers 422 ``file_too_complex``.
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import re
import resource
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

import docx
from bs4 import BeautifulSoup
from docx.enum.style import WD_STYLE_TYPE
from pebble import ProcessExpired, ProcessPool
from pypdf import PdfReader

_SURROGATE = re.compile("[\ud800-\udfff]")
SUPPORTED = (".pdf", ".html", ".htm", ".docx", ".md", ".markdown", ".txt")


class Unparseable(Exception):
    """A file that cannot be turned into text; the message says why."""


class TooComplex(Unparseable):
    """A file over one of the parsing limits; the message names the limit's setting."""


@dataclass(frozen=True)
class ParseLimits:
    """What one file may expand to before it is parsed (each bound is a ``RAG_FILE_*`` setting)."""

    max_unpacked_bytes: int = 100 * 1024 * 1024  # .docx: the sizes of its zip members, added up
    max_paragraphs: int = 100_000  # .docx: paragraphs and table rows
    max_pages: int = 2000  # PDF
    max_content_bytes: int = 64 * 1024 * 1024  # PDF: page content streams, decoded, over all pages


def _over(what: str, value: int, limit: int, setting: str) -> TooComplex:
    return TooComplex(f"{what.format(value)}, over the limit of {limit} ({setting})")


@dataclass(frozen=True)
class ParsedFile:
    text: str
    title: str
    format: str


def _tidy(text: str) -> str:
    """Trailing spaces off, runs of blank lines down to one, so chunks are cut at real paragraphs."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Unparseable(f"not UTF-8 text (byte {exc.start})") from None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def parse_pdf(data: bytes, limits: ParseLimits) -> ParsedFile:
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Unparseable("the PDF is encrypted")
        if len(reader.pages) > limits.max_pages:
            raise _over("has {} pages", len(reader.pages), limits.max_pages, "RAG_FILE_MAX_PAGES")
        pages: list[str] = []
        content = 0
        for page in reader.pages:
            stream = page.get_contents()
            content += len(stream.get_data()) if stream is not None else 0
            if content > limits.max_content_bytes:
                raise TooComplex(
                    f"its pages' content decodes to more than {limits.max_content_bytes} bytes "
                    "(RAG_FILE_MAX_CONTENT_BYTES)"
                )
            pages.append(page.extract_text() or "")
        meta = reader.metadata
        title = str(meta.title or "").strip() if meta is not None else ""
    except Unparseable:
        raise
    except Exception as exc:  # pypdf raises many kinds on a damaged file
        raise Unparseable(f"not a readable PDF ({type(exc).__name__}: {str(exc)[:120]})") from None
    text = _tidy("\n\n".join(pages))
    if not text:
        raise Unparseable("the PDF has no text layer (a scan?)")
    return ParsedFile(text=text, title=title or _first_line(text), format="pdf")


_BLOCKS = [
    "p", "div", "section", "article", "main", "header", "footer", "nav", "aside", "li", "ul", "ol", "dl", "dt",
    "dd", "tr", "table", "pre", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "figure", "figcaption",
]  # fmt: skip


def parse_html(data: bytes, limits: ParseLimits) -> ParsedFile:
    soup = BeautifulSoup(data, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    if not title:
        heading = soup.find(["h1", "h2", "h3"])
        title = heading.get_text(" ", strip=True) if heading else ""
    if soup.head is not None:
        soup.head.decompose()
    for br in soup.find_all("br"):
        br.replace_with("\n")
    for block in soup.find_all(_BLOCKS):
        block.insert_before("\n\n")
        block.insert_after("\n\n")
    text = _tidy(re.sub(r"[ \t\f\v]+", " ", soup.get_text()))
    if not text:
        raise Unparseable("the HTML page has no text")
    return ParsedFile(text=text, title=title, format="html")


def parse_docx(data: bytes, limits: ParseLimits) -> ParsedFile:
    try:
        # A member's size as its zip entry declares it bounds what reading it yields (zipfile stops there),
        # so this sum bounds the XML python-docx would parse, before any of it is unpacked.
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            unpacked = sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise Unparseable(f"not a readable .docx ({type(exc).__name__}: {str(exc)[:120]})") from None
    if unpacked > limits.max_unpacked_bytes:
        raise _over("unpacks to {} bytes", unpacked, limits.max_unpacked_bytes, "RAG_FILE_MAX_UNPACKED_BYTES")
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:  # a zip that is not a Word document
        raise Unparseable(f"not a readable .docx ({type(exc).__name__}: {str(exc)[:120]})") from None
    paragraphs = document.paragraphs
    blocks_in_file = len(paragraphs) + sum(len(table.rows) for table in document.tables)
    if blocks_in_file > limits.max_paragraphs:
        raise _over(
            "has {} paragraphs and table rows", blocks_in_file, limits.max_paragraphs, "RAG_FILE_MAX_PARAGRAPHS"
        )
    title = (document.core_properties.title or "").strip()
    # Style names looked up once: python-docx's ``paragraph.style`` scans every style of the document
    # for each paragraph without a style of its own.
    styles = document.styles
    names = {style.style_id: style.name or "" for style in styles if style.type == WD_STYLE_TYPE.PARAGRAPH}
    default = styles.default(WD_STYLE_TYPE.PARAGRAPH)
    default_name = (default.name or "") if default is not None else ""
    blocks: list[str] = []
    for paragraph in paragraphs:
        text = paragraph.text.strip()
        if not text:
            continue
        if not title:
            style_id = paragraph._p.style
            style = names.get(style_id, default_name) if style_id is not None else default_name
            if style == "Title" or style.startswith("Heading"):
                title = text
        blocks.append(text)
    for table in document.tables:
        for row in table.rows:
            cells = [cell.text.strip() for cell in row.cells if cell.text.strip()]
            if cells:
                blocks.append(" | ".join(cells))
    text = _tidy("\n\n".join(blocks))
    if not text:
        raise Unparseable("the .docx has no text")
    return ParsedFile(text=text, title=title, format="docx")


def parse_markdown(data: bytes, limits: ParseLimits) -> ParsedFile:
    text = _tidy(_decode(data))
    if not text:
        raise Unparseable("the file is empty")
    title = ""
    for line in text.splitlines():
        match = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match:
            title = match.group(1)
            break
    return ParsedFile(text=text, title=title, format="markdown")


def parse_text(data: bytes, limits: ParseLimits) -> ParsedFile:
    text = _tidy(_decode(data))
    if not text:
        raise Unparseable("the file is empty")
    return ParsedFile(text=text, title="", format="text")


PARSERS: dict[str, Callable[[bytes, ParseLimits], ParsedFile]] = {
    ".pdf": parse_pdf,
    ".html": parse_html,
    ".htm": parse_html,
    ".docx": parse_docx,
    ".md": parse_markdown,
    ".markdown": parse_markdown,
    ".txt": parse_text,
}


def parse_file(filename: str, data: bytes, limits: ParseLimits | None = None) -> ParsedFile:
    """The file's text and title; the title falls back to the file's name. Raises ``Unparseable`` (and
    ``TooComplex`` for a file over one of ``limits``). Runs where it is called: ``FileParser`` runs it in
    a worker process."""
    suffix = PurePosixPath(filename).suffix.lower()
    parser = PARSERS.get(suffix)
    if parser is None:
        raise Unparseable(f"unsupported file type {suffix or '(none)'!r}; supported: {', '.join(SUPPORTED)}")
    parsed = parser(data, limits or ParseLimits())
    # NULs go; lone surrogates (a PDF's own text encoding can spell them; they are not characters) become U+FFFD.
    text = _SURROGATE.sub("\ufffd", parsed.text.replace("\x00", ""))
    title = _SURROGATE.sub("\ufffd", parsed.title).strip()[:300] or PurePosixPath(filename).stem
    return ParsedFile(text=text, title=title, format=parsed.format)


def _limit_memory(max_bytes: int) -> None:
    """In each worker process, before its first file: the address space it may use."""
    resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))


class FileParser:
    """``parse_file`` in worker processes: at most ``workers`` files at once, each within ``timeout`` seconds
    and ``memory_mb`` MiB of address space; the event loop only waits. A parse whose caller is cancelled
    stops its process."""

    # A worker is replaced after this many files, so memory a large file left fragmented is given back.
    MAX_FILES_PER_WORKER = 50

    def __init__(self, limits: ParseLimits, *, workers: int, timeout: float, memory_mb: int) -> None:
        self.limits = limits
        self.timeout = timeout
        self.memory_mb = memory_mb
        # Processes are started when the first file comes, from a fork server: never forked from the
        # event loop's process, whose threads a fork would copy mid-flight.
        self._pool = ProcessPool(
            max_workers=workers,
            max_tasks=self.MAX_FILES_PER_WORKER,
            initializer=_limit_memory,
            initargs=(memory_mb * 1024 * 1024,),
            context=multiprocessing.get_context("forkserver"),
        )

    async def parse(self, filename: str, data: bytes) -> ParsedFile:
        future = self._pool.schedule(parse_file, args=(filename, data, self.limits), timeout=self.timeout)
        try:
            # Cancelling the awaiting task cancels the pebble future, which stops its worker process.
            return await asyncio.wrap_future(future)
        except TimeoutError:
            raise TooComplex(f"parsing took longer than {self.timeout:g} s (RAG_FILE_PARSE_TIMEOUT_SECONDS)") from None
        except MemoryError:
            raise TooComplex(f"parsing needs more than {self.memory_mb} MiB (RAG_FILE_PARSE_MEMORY_MB)") from None
        except ProcessExpired as exc:  # killed: by the kernel for its memory, or by a signal
            raise TooComplex(
                f"the parsing process stopped (exit code {exc.exitcode}); the file may need more than "
                f"{self.memory_mb} MiB (RAG_FILE_PARSE_MEMORY_MB)"
            ) from None

    def close(self) -> None:
        self._pool.stop()  # type: ignore[no-untyped-call]
        self._pool.join(timeout=5)
