from __future__ import annotations

import time
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Request

from services.common.errors import UpstreamUnavailable
from services.common.http import ServiceClient
from services.retriever.chunking import chunk_text, point_id
from services.retriever.config import Settings
from services.retriever.metrics import CHUNKS_INDEXED, DOCUMENTS_INDEXED, STAGE_SECONDS
from services.retriever.schemas import (
    DocumentsRequest,
    DocumentsResponse,
    SearchRequest,
    SearchResponse,
    StatsResponse,
)
from services.retriever.store import VectorStore

log = structlog.get_logger(__name__)
router = APIRouter()


def get_store(request: Request) -> VectorStore:
    store: VectorStore = request.app.state.store
    return store


def get_embedding(request: Request) -> ServiceClient:
    client: ServiceClient = request.app.state.embedding
    return client


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


StoreDep = Annotated[VectorStore, Depends(get_store)]
EmbeddingDep = Annotated[ServiceClient, Depends(get_embedding)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RequestIdDep = Annotated[str, Depends(request_id)]


async def embed(client: ServiceClient, texts: list[str], rid: str) -> tuple[list[list[float]], int]:
    body: dict[str, Any] = await client.post("/v1/embed", {"texts": texts}, request_id=rid)
    vectors: list[list[float]] = body["vectors"]
    if len(vectors) != len(texts):
        raise UpstreamUnavailable("embedding answered with the wrong number of vectors")
    return vectors, int(body["dimension"])


@router.post("/v1/documents", response_model=DocumentsResponse)
async def index_documents(
    body: DocumentsRequest, store: StoreDep, embedding: EmbeddingDep, settings: SettingsDep, rid: RequestIdDep
) -> DocumentsResponse:
    # Chunk and embed everything first: a failure here has written nothing.
    planned = []
    for doc in body.documents:
        chunks = chunk_text(doc.text, settings.chunk_size, settings.chunk_overlap)
        vectors: list[list[float]] = []
        dimension = 0
        for start in range(0, len(chunks), settings.embed_batch_size):
            batch, dimension = await embed(embedding, chunks[start : start + settings.embed_batch_size], rid)
            vectors.extend(batch)
        planned.append((doc, chunks, vectors, dimension))
    total = 0
    for doc, chunks, vectors, dimension in planned:
        await store.ensure_collection(dimension)
        ids = [point_id(doc.id, i) for i in range(len(chunks))]
        payloads = [
            {"document_id": doc.id, "chunk": i, "text": chunk, "metadata": doc.metadata}
            for i, chunk in enumerate(chunks)
        ]
        await store.replace_document(doc.id, ids, vectors, payloads)
        total += len(chunks)
    DOCUMENTS_INDEXED.inc(len(planned))
    CHUNKS_INDEXED.inc(total)
    log.info("documents_indexed", documents=len(planned), chunks=total)
    return DocumentsResponse(indexed=len(planned), chunks=total)


@router.post("/v1/search", response_model=SearchResponse)
async def search(body: SearchRequest, store: StoreDep, embedding: EmbeddingDep, rid: RequestIdDep) -> SearchResponse:
    start = time.perf_counter()
    vectors, _ = await embed(embedding, [body.query], rid)
    embedded = time.perf_counter()
    hits = await store.search(vectors[0], body.top_k, body.filters)
    done = time.perf_counter()
    STAGE_SECONDS.labels("embed").observe(embedded - start)
    STAGE_SECONDS.labels("search").observe(done - embedded)
    log.info("retrieval_done", k=body.top_k, hits=len(hits), search_ms=round((done - embedded) * 1000, 2))
    return SearchResponse(hits=hits, embed_ms=(embedded - start) * 1000, search_ms=(done - embedded) * 1000)


@router.get("/v1/stats", response_model=StatsResponse)
async def stats(store: StoreDep) -> StatsResponse:
    return StatsResponse(collection=store.collection, points=await store.count(), store=store.location)
