from __future__ import annotations

import base64
import binascii
import time
from typing import Annotated

import structlog
from fastapi import APIRouter, Query, Request, Response

from services.common import tracing
from services.common.disconnect import unless_disconnected
from services.common.errors import InvalidInput, NotFound
from services.retriever.deps import (
    DimensionsDep,
    EmbeddingDep,
    EncoderDep,
    RequestIdDep,
    SettingsDep,
    StoreDep,
    TenantDep,
)
from services.retriever.indexing import index_documents
from services.retriever.metrics import DOCUMENTS_DELETED, STAGE_SECONDS
from services.retriever.schemas import (
    DocumentEntry,
    DocumentList,
    DocumentsDelete,
    DocumentsDeleted,
    DocumentsRequest,
    DocumentsResponse,
    SearchRequest,
    SearchResponse,
    StatsResponse,
)

log = structlog.get_logger(__name__)
tracer = tracing.tracer(__name__)
router = APIRouter()


@router.post("/v1/documents", response_model=DocumentsResponse)
async def add_documents(
    body: DocumentsRequest,
    store: StoreDep,
    dimensions: DimensionsDep,
    embedding: EmbeddingDep,
    encoder: EncoderDep,
    settings: SettingsDep,
    rid: RequestIdDep,
    request: Request,
    tenant: TenantDep,
) -> DocumentsResponse:
    # Indexing stops when the caller goes away (it gave up, or its own caller did): its embedding calls with it.
    chunks = await unless_disconnected(
        request,
        index_documents(
            body.documents,
            store=store,
            embedding=embedding,
            encoder=encoder,
            dimensions=dimensions,
            chunk_size=settings.chunk_size,
            overlap=settings.chunk_overlap,
            batch_size=settings.embed_batch_size,
            concurrency=settings.embed_concurrency,
            request_id=rid,
            tenant=tenant,
        ),
    )
    return DocumentsResponse(indexed=len(body.documents), chunks=chunks)


@router.get("/v1/documents", response_model=DocumentList)
async def list_documents(
    store: StoreDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="Documents per page.")] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
) -> DocumentList:
    docs, after = await store.list_documents(limit, None if cursor is None else _after(cursor), tenant)
    return DocumentList(
        documents=[DocumentEntry(id=d.id, chunks=d.chunks, metadata=d.metadata) for d in docs],
        next_cursor=None if after is None else CURSOR_MARK + base64.urlsafe_b64encode(after.encode()).decode(),
    )


CURSOR_MARK = "id:"
"""A cursor is the last id of its page, base64url-encoded behind this mark: pages follow in id order."""


def _after(cursor: str) -> str:
    """The id a cursor this service returned names; 422 for anything else."""
    try:
        if not cursor.startswith(CURSOR_MARK):
            raise ValueError(cursor)
        return base64.urlsafe_b64decode(cursor.removeprefix(CURSOR_MARK).encode("ascii")).decode()
    except (ValueError, binascii.Error):
        raise InvalidInput("cursor: not a cursor this service returned") from None


@router.post("/v1/documents/delete", response_model=DocumentsDeleted)
async def delete_documents(body: DocumentsDelete, store: StoreDep, tenant: TenantDep) -> DocumentsDeleted:
    if (missing := body.selector_missing()) is not None:
        raise InvalidInput(missing)
    deleted = await store.delete_documents(body.prefix, body.filter, tenant)
    DOCUMENTS_DELETED.inc(deleted)
    log.info("documents_deleted", tenant=tenant, prefix=body.prefix, filter=body.filter, documents=deleted)
    return DocumentsDeleted(deleted=deleted)


@router.get("/v1/documents/{document_id:path}", response_model=DocumentEntry)
async def get_document(document_id: str, store: StoreDep, tenant: TenantDep) -> DocumentEntry:
    doc = await store.get_document(document_id, tenant)
    if doc is None:
        raise NotFound(f"document {document_id!r} is not indexed")
    return DocumentEntry(id=doc.id, chunks=doc.chunks, metadata=doc.metadata)


@router.delete("/v1/documents/{document_id:path}", status_code=204, response_class=Response)
async def delete_document(document_id: str, store: StoreDep, tenant: TenantDep) -> Response:
    if not await store.delete_document(document_id, tenant):
        raise NotFound(f"document {document_id!r} is not indexed")
    DOCUMENTS_DELETED.inc()
    log.info("document_deleted", tenant=tenant, document_id=document_id)
    return Response(status_code=204)


@router.post("/v1/search", response_model=SearchResponse)
async def search(
    body: SearchRequest,
    store: StoreDep,
    dimensions: DimensionsDep,
    embedding: EmbeddingDep,
    encoder: EncoderDep,
    settings: SettingsDep,
    rid: RequestIdDep,
    tenant: TenantDep,
) -> SearchResponse:
    start = time.perf_counter()
    with tracer.start_as_current_span("embed"):
        embedded = await embedding.embed([body.query], rid)
    after_embed = time.perf_counter()
    dimensions.compare(embedded.dimension)
    with tracer.start_as_current_span("search") as span:
        span.set_attribute("ragpod.search.mode", settings.search_mode)
        sparse = encoder.query(body.query) if settings.search_mode == "hybrid" else None
        hits = await store.search(
            embedded.vectors[0], sparse, body.top_k, body.filters, settings.search_mode, settings.search_fusion, tenant
        )
        span.set_attribute("ragpod.search.hits", len(hits))
    done = time.perf_counter()
    STAGE_SECONDS.labels("embed").observe(after_embed - start)
    STAGE_SECONDS.labels("search").observe(done - after_embed)
    log.info(
        "retrieval_done",
        k=body.top_k,
        hits=len(hits),
        mode=settings.search_mode,
        search_ms=round((done - after_embed) * 1000, 2),
    )
    return SearchResponse(hits=hits, embed_ms=(after_embed - start) * 1000, search_ms=(done - after_embed) * 1000)


@router.get("/v1/stats", response_model=StatsResponse)
async def stats(store: StoreDep, settings: SettingsDep) -> StatsResponse:
    return StatsResponse(
        collection=store.collection,
        points=await store.count(),
        store=store.location,
        search_mode=settings.search_mode,
        search_fusion=settings.search_fusion,
    )
