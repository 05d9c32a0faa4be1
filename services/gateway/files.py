"""Uploaded files to plain text and a title: .pdf, .html, .docx, .md and .txt.

Parsing happens in the gateway, before anything is sent to the retriever, so a request whose files
cannot all be read writes nothing. The libraries are pure Python (pypdf, BeautifulSoup, python-docx):
the gateway image stays free of torch and of native parsers.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

import docx
from bs4 import BeautifulSoup
from pypdf import PdfReader

SUPPORTED = (".pdf", ".html", ".htm", ".docx", ".md", ".markdown", ".txt")


class Unparseable(Exception):
    """A file that cannot be turned into text; the message says why."""


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


def parse_pdf(data: bytes) -> ParsedFile:
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Unparseable("the PDF is encrypted")
        pages = [page.extract_text() or "" for page in reader.pages]
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


def parse_html(data: bytes) -> ParsedFile:
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


def parse_docx(data: bytes) -> ParsedFile:
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:  # a zip that is not a Word document, or not a zip at all
        raise Unparseable(f"not a readable .docx ({type(exc).__name__}: {str(exc)[:120]})") from None
    title = (document.core_properties.title or "").strip()
    blocks: list[str] = []
    for paragraph in document.paragraphs:
        text = paragraph.text.strip()
        if not text:
            continue
        style = (paragraph.style.name or "") if paragraph.style is not None else ""
        if not title and (style == "Title" or style.startswith("Heading")):
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


def parse_markdown(data: bytes) -> ParsedFile:
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


def parse_text(data: bytes) -> ParsedFile:
    text = _tidy(_decode(data))
    if not text:
        raise Unparseable("the file is empty")
    return ParsedFile(text=text, title="", format="text")


PARSERS: dict[str, Callable[[bytes], ParsedFile]] = {
    ".pdf": parse_pdf,
    ".html": parse_html,
    ".htm": parse_html,
    ".docx": parse_docx,
    ".md": parse_markdown,
    ".markdown": parse_markdown,
    ".txt": parse_text,
}


def parse_file(filename: str, data: bytes) -> ParsedFile:
    """The file's text and title; the title falls back to the file's name. Raises ``Unparseable``."""
    suffix = PurePosixPath(filename).suffix.lower()
    parser = PARSERS.get(suffix)
    if parser is None:
        raise Unparseable(f"unsupported file type {suffix or '(none)'!r}; supported: {', '.join(SUPPORTED)}")
    parsed = parser(data)
    if "\x00" in parsed.text:
        parsed = ParsedFile(text=parsed.text.replace("\x00", ""), title=parsed.title, format=parsed.format)
    title = parsed.title.strip()[:300] or PurePosixPath(filename).stem
    return ParsedFile(text=parsed.text, title=title, format=parsed.format)
