"""Search without generation (the question pipeline's retrieval), the documents in the index (list, get,
delete), and file uploads.

The documents routes pass through to the retriever, which owns the index; file uploads are parsed here
(``services.gateway.files``) and sent to the retriever as one batch, so a request is all or nothing.
"""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import quote

import structlog
from fastapi import APIRouter, FastAPI, File, Form, Query, Request, Response, UploadFile
from pydantic import ValidationError

from services.common.disconnect import unless_disconnected
from services.common.errors import FileTooComplex, InvalidInput, NotFound
from services.common.schemas import Document, DocumentsDelete, DocumentsDeleted, DocumentsResponse
from services.gateway import pipeline
from services.gateway.config import Settings
from services.gateway.deps import FileParserDep, Reader, RequestIdDep, RetrieverDep, SettingsDep, Writer
from services.gateway.files import TooComplex, Unparseable
from services.gateway.pipeline import Question
from services.gateway.schemas import (
    DocumentInfo,
    DocumentList,
    FileIndexed,
    FilesResponse,
    SearchQuery,
    SearchResults,
    SearchTimings,
    error_responses,
)
from services.gateway.surrogates import check_text

log = structlog.get_logger(__name__)
router = APIRouter(tags=["documents"])

GUARDED = (401, 403, 413, 429)  # what the front door itself can answer on any guarded route
UPSTREAM = (502, 503, 504)  # the retriever (or what it uses) failed, is down or too slow


def document_path(document_id: str) -> str:
    """The retriever's path for one document; the id travels as a single escaped segment."""
    if not document_id:
        raise NotFound("no document has an empty id")
    return "/v1/documents/" + quote(document_id, safe="")


@router.post(
    "/v1/search",
    response_model=SearchResults,
    dependencies=[Reader],
    responses=error_responses(400, *GUARDED, 422, *UPSTREAM),
    summary="Retrieve the chunks that answer a question, without generating an answer",
)
async def search(body: SearchQuery, settings: SettingsDep, retriever: RetrieverDep, rid: RequestIdDep) -> SearchResults:
    question = Question(body.question, body.top_k, body.filters)
    found = await pipeline.retrieve(question, settings, retriever, rid)
    total_ms = found.total_ms()
    log.info(
        "search_done", k=body.top_k, hits=len(found.search.hits), kept=len(found.sources), total_ms=round(total_ms, 2)
    )
    return SearchResults(
        sources=found.sources,
        timings=SearchTimings(
            embed_ms=round(found.search.embed_ms, 2),
            search_ms=round(found.search.search_ms, 2),
            total_ms=round(total_ms, 2),
        ),
    )


@router.get(
    "/v1/documents",
    response_model=DocumentList,
    dependencies=[Reader],
    responses=error_responses(*GUARDED, 422, *UPSTREAM),
    summary="The indexed documents, a page at a time",
)
async def list_documents(
    retriever: RetrieverDep,
    rid: RequestIdDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="Documents per page.")] = 100,
    cursor: Annotated[
        str | None, Query(max_length=4096, description="next_cursor of the previous page; absent for the first.")
    ] = None,
) -> DocumentList:
    params: dict[str, Any] = {"limit": limit}
    if cursor:
        params["cursor"] = cursor
    return await retriever.get("/v1/documents", params=params, request_id=rid, model=DocumentList)


@router.post(
    "/v1/documents/delete",
    response_model=DocumentsDeleted,
    dependencies=[Writer],
    responses=error_responses(400, *GUARDED, 422, *UPSTREAM),
    summary="Remove every document under an id prefix or with given metadata; answers how many",
)
async def delete_documents(body: DocumentsDelete, retriever: RetrieverDep, rid: RequestIdDep) -> DocumentsDeleted:
    if (missing := body.selector_missing()) is not None:
        raise InvalidInput(missing)
    # Not resent on a failed connection: a second try would answer 0 for what the first one deleted.
    result = await retriever.post(
        "/v1/documents/delete", body.model_dump(exclude_none=True), request_id=rid, model=DocumentsDeleted
    )
    log.info("documents_deleted", prefix=body.prefix, filter=body.filter, documents=result.deleted)
    return result


@router.get(
    "/v1/documents/{document_id:path}",
    response_model=DocumentInfo,
    dependencies=[Reader],
    responses=error_responses(*GUARDED, 404, 422, *UPSTREAM),
    summary="One document: its chunk count and metadata",
)
async def get_document(document_id: str, retriever: RetrieverDep, rid: RequestIdDep) -> DocumentInfo:
    return await retriever.get(document_path(document_id), request_id=rid, model=DocumentInfo)


@router.delete(
    "/v1/documents/{document_id:path}",
    status_code=204,
    response_class=Response,
    dependencies=[Writer],
    responses=error_responses(*GUARDED, 404, 422, *UPSTREAM),
    summary="Remove a document and every one of its chunks",
)
async def delete_document(document_id: str, retriever: RetrieverDep, rid: RequestIdDep) -> Response:
    await retriever.request("DELETE", document_path(document_id), request_id=rid)
    log.info("document_deleted", document_id=document_id)
    return Response(status_code=204)


@router.post(
    "/v1/files",
    response_model=FilesResponse,
    dependencies=[Writer],
    responses=error_responses(400, *GUARDED, 422, *UPSTREAM),
    summary="Index files (.pdf, .html, .docx, .md, .txt); all of them or none",
)
async def upload_files(
    request: Request,
    settings: SettingsDep,
    retriever: RetrieverDep,
    parser: FileParserDep,
    rid: RequestIdDep,
    files: Annotated[list[UploadFile], File(description="One or more files; a file's id is its name.")],
    id: Annotated[
        list[str] | None, Form(description="Ids for the files, in the same order (default: their names).")
    ] = None,
    metadata: Annotated[str | None, Form(description="A JSON object added to the metadata of every file.")] = None,
) -> FilesResponse:
    if len(files) > settings.max_documents_per_request:
        raise InvalidInput(f"files: at most {settings.max_documents_per_request} files per request")
    if id is not None and len(id) != len(files):
        raise InvalidInput(f"id: {len(id)} ids given for {len(files)} files; give one per file or none")
    extra = _metadata(metadata)
    documents: list[Document] = []
    indexed: list[FileIndexed] = []
    for index, upload in enumerate(files):
        name = upload.filename or ""
        document_id = id[index] if id is not None else name
        label = name or f"files.{index}"
        if not document_id.strip():
            raise InvalidInput(f"files.{index}: the file has no name; give its id in the form field id")
        try:
            parsed = await parser.parse(name or document_id, await upload.read())
        except TooComplex as exc:
            raise FileTooComplex(f"files.{index} ({label}): too complex to parse: {exc}") from None
        except Unparseable as exc:
            raise InvalidInput(f"files.{index} ({label}): cannot be parsed: {exc}") from None
        if len(parsed.text) > settings.max_document_chars:
            raise InvalidInput(f"files.{index} ({label}): longer than {settings.max_document_chars} characters")
        meta = {**extra, "title": parsed.title, "filename": name, "format": parsed.format}
        try:
            documents.append(Document(id=document_id, text=parsed.text, metadata=meta))
        except ValidationError as exc:
            reason = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise InvalidInput(f"files.{index} ({label}): {reason}") from None
        if any(doc.id == document_id for doc in documents[:-1]):
            raise InvalidInput(f"files.{index}: id {document_id!r} appears more than once")
        indexed.append(FileIndexed(id=document_id, title=parsed.title, format=parsed.format, chars=len(parsed.text)))
    payload = {"documents": [doc.model_dump() for doc in documents]}
    # Chunk ids are deterministic: the same documents sent twice are written once. The wait grows with the
    # text sent; a caller that goes away stops the retriever's work with it.
    timeout = settings.ingest_timeout(sum(len(doc.text) for doc in documents))
    result = await unless_disconnected(
        request,
        retriever.post(
            "/v1/documents", payload, idempotent=True, request_id=rid, time_limit=timeout, model=DocumentsResponse
        ),
    )
    log.info("files_indexed", files=len(indexed), chunks=result.chunks)
    return FilesResponse(indexed=result.indexed, chunks=result.chunks, files=indexed)


def _metadata(raw: str | None) -> dict[str, Any]:
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise InvalidInput("metadata: not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidInput("metadata: must be a JSON object")
    check_text(value, "metadata")
    return value


def describe_limits(app: FastAPI, settings: Settings) -> None:
    """The OpenAPI document states the limits this gateway enforces (RAG_TOP_K_MAX, RAG_MAX_QUESTION_CHARS,
    RAG_MAX_DOCUMENTS_PER_REQUEST, RAG_MAX_DOCUMENT_CHARS), so clients and generators see them."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            models = build().get("components", {}).get("schemas", {})

            def limit(model: str, field: str, key: str, value: int) -> None:
                prop = models.get(model, {}).get("properties", {}).get(field)
                if prop is not None:
                    prop[key] = value

            for model in ("AskRequest", "SearchQuery"):
                limit(model, "top_k", "maximum", settings.top_k_max)
                limit(model, "question", "maxLength", settings.max_question_chars)
            limit("DocumentsRequest", "documents", "maxItems", settings.max_documents_per_request)
            limit("Document", "text", "maxLength", settings.max_document_chars)
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]
