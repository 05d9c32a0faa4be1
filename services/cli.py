"""``ragpod``: ask questions, index files, run the local stack.

ragpod ask "question" [--top-k 5]
ragpod ingest PATH [PATH ...]      (.txt and .md files; folders are walked)
ragpod run [--data-dir DIR]        (the whole stack as local processes)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SUFFIXES = {".txt", ".md"}


class CliSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAG_", extra="ignore")

    gateway_url: str = Field("http://127.0.0.1:8000", description="Where the CLI finds the gateway.")
    api_key: str = Field("", description="API key the CLI sends, when the gateway requires one.")


def read_documents(*paths: Path) -> list[dict[str, Any]]:
    """One document per .txt/.md file; its id is the path relative to the folder given (stable across runs)."""
    documents = []
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if path.suffix.lower() not in SUFFIXES:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                continue
            doc_id = path.name if root.is_file() else str(path.relative_to(root))
            title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.strip()), path.stem)
            documents.append({"id": doc_id, "text": text, "metadata": {"path": str(path), "title": title[:200]}})
    return documents


def _client(settings: CliSettings) -> httpx.Client:
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    return httpx.Client(base_url=settings.gateway_url, headers=headers, timeout=300)


def _fail(response: httpx.Response) -> int:
    try:
        body = response.json()
        message = f"{body.get('error', 'error')}: {body.get('detail', '')}"
    except ValueError:
        message = response.text[:300]
    print(f"error {response.status_code}: {message}", file=sys.stderr)
    return 1


def cmd_ask(args: argparse.Namespace, settings: CliSettings) -> int:
    with _client(settings) as client:
        try:
            response = client.post("/v1/ask", json={"question": args.question, "top_k": args.top_k})
        except httpx.HTTPError as exc:
            print(f"cannot reach the gateway at {settings.gateway_url}: {exc}", file=sys.stderr)
            return 1
    if response.status_code != 200:
        return _fail(response)
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
    return 0


def cmd_ingest(args: argparse.Namespace, settings: CliSettings) -> int:
    from tqdm import tqdm

    paths = [Path(p) for p in args.paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 1
    documents = read_documents(*paths)
    if not documents:
        print("no .txt or .md files with text found", file=sys.stderr)
        return 1
    chunks = 0
    with _client(settings) as client, tqdm(total=len(documents), unit="doc", desc="indexing") as bar:
        for start in range(0, len(documents), args.batch):
            batch = documents[start : start + args.batch]
            try:
                response = client.post("/v1/documents", json={"documents": batch})
            except httpx.HTTPError as exc:
                print(f"cannot reach the gateway at {settings.gateway_url}: {exc}", file=sys.stderr)
                return 1
            if response.status_code != 200:
                return _fail(response)
            chunks += int(response.json()["chunks"])
            bar.update(len(batch))
    print(f"indexed {len(documents)} documents, {chunks} chunks")
    return 0


def cmd_run(args: argparse.Namespace, settings: CliSettings) -> int:
    from services import devstack

    return devstack.main(Path(args.data_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ragpod", description="Ask questions over your own documents.")
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="ask a question; prints the answer and its sources")
    ask.add_argument("question")
    ask.add_argument("--top-k", type=int, default=5)
    ingest = sub.add_parser("ingest", help="index .txt and .md files")
    ingest.add_argument("paths", nargs="+")
    ingest.add_argument("--batch", type=int, default=16, help="documents per request")
    run = sub.add_parser("run", help="start the whole stack locally")
    run.add_argument("--data-dir", default="data", help="where local state and logs live")
    args = parser.parse_args(argv)
    settings = CliSettings()
    handlers = {"ask": cmd_ask, "ingest": cmd_ingest, "run": cmd_run}
    return handlers[args.command](args, settings)


if __name__ == "__main__":
    raise SystemExit(main())
