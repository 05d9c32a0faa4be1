from __future__ import annotations

import time
import uuid
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
)
from services.retriever.indexing import index_documents
from services.retriever.metrics import DOCUMENTS_DELETED, STAGE_SECONDS
from services.retriever.schemas import (
    DocumentEntry,
    DocumentList,
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
        ),
    )
    return DocumentsResponse(indexed=len(body.documents), chunks=chunks)


@router.get("/v1/documents", response_model=DocumentList)
async def list_documents(
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="Documents per page.")] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
) -> DocumentList:
    if cursor is not None:
        try:
            cursor = str(uuid.UUID(cursor))
        except ValueError:
            raise InvalidInput("cursor: not a cursor this service returned") from None
    docs, next_cursor = await store.list_documents(limit, cursor)
    return DocumentList(
        documents=[DocumentEntry(id=d.id, chunks=d.chunks, metadata=d.metadata) for d in docs],
        next_cursor=next_cursor,
    )


@router.get("/v1/documents/{document_id:path}", response_model=DocumentEntry)
async def get_document(document_id: str, store: StoreDep) -> DocumentEntry:
    doc = await store.get_document(document_id)
    if doc is None:
        raise NotFound(f"document {document_id!r} is not indexed")
    return DocumentEntry(id=doc.id, chunks=doc.chunks, metadata=doc.metadata)


@router.delete("/v1/documents/{document_id:path}", status_code=204, response_class=Response)
async def delete_document(document_id: str, store: StoreDep) -> Response:
    if not await store.delete_document(document_id):
        raise NotFound(f"document {document_id!r} is not indexed")
    DOCUMENTS_DELETED.inc()
    log.info("document_deleted", document_id=document_id)
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
            embedded.vectors[0], sparse, body.top_k, body.filters, settings.search_mode, settings.search_fusion
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
