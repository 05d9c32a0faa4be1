"""``ragpod``: ask questions, index files, list and delete documents, run the local stack.

ragpod [--gateway URL] COMMAND     (default: $RAG_GATEWAY_URL, else http://127.0.0.1:8000)
ragpod ask "question" [--top-k 5]
ragpod ingest PATH [PATH ...]      (.md, .txt, .pdf, .html, .docx; folders are walked)
ragpod ls [--page-size N]          (every indexed document: id, chunks, title)
ragpod rm ID [ID ...]              (delete documents and all their chunks)
ragpod rm --prefix P [--where K=V] (delete every document under an id prefix and/or with metadata K=V)
ragpod run [--data-dir DIR]        (the whole stack as local processes)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ragpod.documents import SUFFIXES, Found, NotText, as_document, find_files

# Files go to POST /v1/files in requests of at most this many bytes (one larger file goes alone).
FILE_BATCH_BYTES = 4 * 1024 * 1024
CONTENT_TYPES = {
    ".pdf": "application/pdf",
    ".html": "text/html",
    ".htm": "text/html",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
}


class CliSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAG_", extra="ignore")

    gateway_url: str = Field("http://127.0.0.1:8000", description="Where the CLI finds the gateway.")
    api_key: str = Field("", description="API key the CLI sends, when the gateway requires one.")


class CliError(Exception):
    """Ends the command with its message on stderr and exit status 1."""


def _client(settings: CliSettings) -> httpx.Client:
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    return httpx.Client(base_url=settings.gateway_url, headers=headers, timeout=300)


def _send(client: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Response:
    try:
        return client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the gateway at {client.base_url}: {exc}") from exc


def _error(response: httpx.Response) -> CliError:
    try:
        body = response.json()
        message = f"{body.get('error', 'error')}: {body.get('detail', '')}"
    except (ValueError, AttributeError):
        message = response.text[:300]
    return CliError(f"error {response.status_code}: {message}")


def cmd_ask(args: argparse.Namespace, client: httpx.Client) -> None:
    response = _send(client, "POST", "/v1/ask", json={"question": args.question, "top_k": args.top_k})
    if response.status_code != 200:
        raise _error(response)
    body = response.json()
    print(body["answer"].strip() or "(empty answer)")
    print("\nSources:")
    for number, source in enumerate(body["sources"], start=1):
        snippet = " ".join(source["text"].split())[:100]
        print(f"  [{number}] {source['document_id']} (chunk {source['chunk']}, score {source['score']:.3f}) {snippet}")
    t = body["timings"]
    print(
        f"\nembed {t['embed_ms']:.0f} ms, search {t['search_ms']:.0f} ms, queue {t['queue_ms']:.0f} ms, "
        f"generate {t['generate_ms']:.0f} ms, total {t['total_ms']:.0f} ms"
    )


def _file_batches(files: list[Found], most: int) -> Iterator[list[Found]]:
    batch: list[Found] = []
    size = 0
    for found in files:
        length = found.path.stat().st_size
        if batch and (len(batch) >= most or size + length > FILE_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(found)
        size += length
    if batch:
        yield batch


def _post_files(client: httpx.Client, batch: list[Found]) -> int:
    """One all-or-nothing POST /v1/files; the chunks written."""
    handles = [found.path.open("rb") for found in batch]
    try:
        parts = [
            (
                "files",
                (found.path.name, handle, CONTENT_TYPES.get(found.path.suffix.lower(), "application/octet-stream")),
            )
            for found, handle in zip(batch, handles, strict=True)
        ]
        # The ids travel beside the files (form field ``id``, in order): a path relative to the folder given.
        response = _send(client, "POST", "/v1/files", files=parts, data={"id": [found.id for found in batch]})
    finally:
        for handle in handles:
            handle.close()
    if response.status_code != 200:
        raise _error(response)
    return int(response.json().get("chunks", 0))


def cmd_ingest(args: argparse.Namespace, client: httpx.Client) -> None:
    from tqdm import tqdm

    paths = [Path(p) for p in args.paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise CliError(f"no such file or folder: {', '.join(missing)}")
    found = find_files(*paths)
    try:
        documents = [doc for doc in map(as_document, (f for f in found if f.is_text)) if doc is not None]
    except NotText as exc:
        raise CliError(f"{exc}; nothing was indexed") from None
    files = [f for f in found if not f.is_text]
    if not documents and not files:
        raise CliError(f"no files with text found (ragpod indexes {', '.join(sorted(SUFFIXES))})")
    chunks = 0
    with tqdm(total=len(documents) + len(files), unit="doc", desc="indexing") as bar:
        for start in range(0, len(documents), args.batch):
            batch = documents[start : start + args.batch]
            response = _send(client, "POST", "/v1/documents", json={"documents": batch})
            if response.status_code != 200:
                raise _error(response)
            chunks += int(response.json()["chunks"])
            bar.update(len(batch))
        for file_batch in _file_batches(files, args.batch):
            chunks += _post_files(client, file_batch)
            bar.update(len(file_batch))
    print(f"indexed {len(documents) + len(files)} documents, {chunks} chunks")


def cmd_ls(args: argparse.Namespace, client: httpx.Client) -> None:
    cursor: str | None = None
    count = 0
    while True:
        params: dict[str, str | int] = {"limit": args.page_size}
        if cursor:
            params["cursor"] = cursor
        response = _send(client, "GET", "/v1/documents", params=params)
        if response.status_code != 200:
            raise _error(response)
        page = response.json()
        for document in page["documents"]:
            title = (document.get("metadata") or {}).get("title", "")
            print(f"{document['id']}\t{document['chunks']} chunks\t{title}".rstrip())
            count += 1
        cursor = page.get("next_cursor")
        if not cursor:
            break
    print(f"{count} documents", file=sys.stderr)


def cmd_rm(args: argparse.Namespace, client: httpx.Client) -> None:
    if args.prefix is not None or args.where:
        if args.ids:
            raise CliError("rm: give ids, or --prefix/--where, not both")
        _rm_selected(args, client)
        return
    if not args.ids:
        raise CliError("rm: give the ids to delete, or --prefix/--where (ragpod ls lists the ids)")
    unknown = []
    for doc_id in args.ids:
        response = _send(client, "DELETE", f"/v1/documents/{quote(doc_id, safe='')}")
        if response.status_code == 404:
            unknown.append(doc_id)
        elif response.status_code not in (200, 204):
            raise _error(response)
        else:
            print(f"deleted {doc_id}")
    if unknown:
        raise CliError(f"no document with id {', '.join(unknown)} (ragpod ls lists them)")


def _rm_selected(args: argparse.Namespace, client: httpx.Client) -> None:
    """One POST /v1/documents/delete for every document the prefix and the metadata fields select."""
    selector: dict[str, Any] = {}
    if args.prefix is not None:
        selector["prefix"] = args.prefix
    if args.where:
        selector["filter"] = dict(_where(item) for item in args.where)
    response = _send(client, "POST", "/v1/documents/delete", json=selector)
    if response.status_code != 200:
        raise _error(response)
    print(f"deleted {response.json()['deleted']} documents")


def _where(item: str) -> tuple[str, str | int | bool]:
    """``KEY=VALUE``; a VALUE that is a JSON integer, true or false is that, anything else a string
    (a JSON string, in quotes, stays a string: ``n="1"``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise CliError(f"--where {item}: expected KEY=VALUE")
    try:
        value = json.loads(raw)
    except ValueError:
        return key, raw
    return key, value if isinstance(value, str | int | bool) else raw


def cmd_run(args: argparse.Namespace) -> None:
    from ragpod import supervisor

    ports: dict[str, int] = {}
    for item in args.port:
        name, _, port = item.partition("=")
        if name not in (*supervisor.PORTS, "redis") or not port.isdigit():
            raise CliError(f"--port {item}: expected NAME=PORT with NAME one of {', '.join(supervisor.PORTS)}, redis")
        ports[name] = int(port)
    chosen = {**supervisor.PORTS, "redis": supervisor.REDIS_PORT, **ports}
    for port in set(chosen.values()):
        sharing = [name for name, value in chosen.items() if value == port]
        if len(sharing) > 1:
            raise CliError(f"--port: {' and '.join(sharing)} would both listen on {port}; give each its own port")
    if args.unresponsive_after < 0:
        raise CliError(f"--unresponsive-after {args.unresponsive_after:g}: expected seconds, 0 or more")
    status = supervisor.main(Path(args.data_dir), ports, args.unresponsive_after)
    if status:
        raise SystemExit(status)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragpod", description="Ask questions over your own documents.")
    parser.add_argument(
        "--gateway",
        metavar="URL",
        help="the gateway to talk to (default: $RAG_GATEWAY_URL, else http://127.0.0.1:8000); "
        "$RAG_API_KEY is sent as its key when set",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="ask a question; prints the answer and its sources")
    ask.add_argument("question")
    ask.add_argument("--top-k", type=int, default=5)
    ingest = sub.add_parser("ingest", help="index .md, .txt, .pdf, .html and .docx files")
    ingest.add_argument("paths", nargs="+")
    ingest.add_argument("--batch", type=int, default=16, help="documents per request")
    ls = sub.add_parser("ls", help="list the indexed documents: id, chunks, title")
    ls.add_argument("--page-size", type=int, default=100, help="documents per request")
    rm = sub.add_parser("rm", help="delete documents (every chunk of each), by id or in bulk")
    rm.add_argument("ids", nargs="*", metavar="ID")
    rm.add_argument("--prefix", help="delete every document whose id starts with this (e.g. docs/)")
    rm.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="delete every document whose metadata KEY equals VALUE (repeatable; with --prefix, both must hold)",
    )
    run = sub.add_parser("run", help="start the whole stack locally; restarts a service that dies")
    run.add_argument("--data-dir", default="data", help="where local state and logs live")
    run.add_argument(
        "--port", action="append", default=[], metavar="NAME=PORT", help="another port for a service or redis"
    )
    run.add_argument(
        "--unresponsive-after",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="restart a service whose /healthz has not answered for this long (0: never); default 30",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handlers = {"ask": cmd_ask, "ingest": cmd_ingest, "ls": cmd_ls, "rm": cmd_rm}
    try:
        if args.command == "run":
            cmd_run(args)
        else:
            settings = CliSettings()
            if args.gateway:
                settings.gateway_url = args.gateway
            with _client(settings) as client:
                handlers[args.command](args, client)
    except CliError as exc:
        print(exc, file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`ragpod ls | head`): stop quietly, as other command line tools do. Output
        # still buffered for the closed pipe goes to /dev/null so the interpreter's own flush at exit
        # does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command stopped by a closed pipe
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
