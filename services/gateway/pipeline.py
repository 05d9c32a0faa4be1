"""The path of one question, whichever route it came by (/v1/ask, /v1/chat/completions, /v1/search).

``retrieve`` validates the question, searches and keeps the sources above the relevance floor.
``ask`` does that, then embeds the sources' sentences and the question in one call to the embedding
service, gives the model the sentences that answer the question (``grounding.select_context``) and
admits one job to the queue. The ``Pending`` it returns follows the job: ``answer()`` for the whole
answer, ``stream()`` for its tokens and then the answer; either way the answer is cleaned
(``grounding.clean_answer``) and each sentence checked against the sources, whose sentences are
already embedded, so only the answer's own sentences take one more call to the embedding service.

Every answer says what it is (``answer_kind``): ``generated``, the model's text, every sentence of
which passed the check; ``extractive``, when it did not (unsupported, looping, empty), the best
sentence or two of the sources quoted with its ``[n]``; ``not_covered``, when no source sentence is
similar enough to the question (``RAG_MIN_QUESTION_SUPPORT``) to answer it, or, before any job, when
none of the sources reaches ``RAG_MIN_RELEVANCE``. A streamed answer that is replaced is announced by
a ``Reset`` before the replacement. The route modules only translate these into their formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from opentelemetry import context as otel_context
from redis.exceptions import OutOfMemoryError, RedisError

from services.common import tracing
from services.common.embedding import EmbeddingClient
from services.common.errors import (
    Busy,
    DeadlineExceeded,
    GenerationFailed,
    InvalidInput,
    QueueFull,
    RagError,
    UpstreamUnavailable,
)
from services.common.http import ServiceClient
from services.common.queue import Event, Job, JobQueue, PoolExhausted
from services.common.schemas import SearchResponse, Source
from services.gateway.attribution import Attribution, Embed, SourceSentences, attribute_to, embed_sources
from services.gateway.config import Settings
from services.gateway.grounding import clean_answer, extract, select_context
from services.gateway.metrics import (
    ANSWER_KINDS,
    ASK_STAGE_SECONDS,
    ATTRIBUTION_SKIPPED,
    REJECTED,
    UNANSWERED,
    UNGROUNDED,
)
from services.gateway.prompt import Conversation, build_messages
from services.gateway.schemas import AnswerKind, AskResponse, Timings

log = structlog.get_logger(__name__)
tracer = tracing.tracer(__name__)

NOT_COVERED = "The indexed documents do not cover this question."


@dataclass(frozen=True)
class Question:
    """One question as every route hands it in."""

    text: str
    top_k: int
    filters: dict[str, Any] | None = None
    field: str = "question"  # where the request carries the text, named when it is refused
    conversation: Conversation | None = None  # chat: earlier turns and the caller's system messages
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None


@dataclass(frozen=True)
class Clients:
    """What the pipeline calls: the retriever, the embedding service (attribution) and the job queue."""

    retriever: ServiceClient
    embedding: EmbeddingClient
    queue: JobQueue


def check_question(question: Question, settings: Settings) -> None:
    """The one validation of a question beyond its schema: the limits this gateway is configured with."""
    if not 1 <= question.top_k <= settings.top_k_max:
        raise InvalidInput(f"top_k: must be between 1 and {settings.top_k_max}")
    if not question.text.strip():
        raise InvalidInput(f"{question.field}: must not be empty or whitespace")
    if len(question.text) > settings.max_question_chars:
        raise InvalidInput(f"{question.field}: longer than {settings.max_question_chars} characters")


def above_floor(sources: list[Source], min_relevance: float) -> list[Source]:
    """The sources whose score (dense cosine similarity to the question) reaches the relevance floor."""
    return [source for source in sources if source.score >= min_relevance]


# A connection of the pool comes free within one blocking read of a job's events (1 s) at most.
BUSY_RETRY_AFTER = {"Retry-After": "1"}


@contextlib.contextmanager
def redis_errors(retry_after: int = 1) -> Iterator[None]:
    try:
        yield
    except OutOfMemoryError as exc:  # up, but at maxmemory with noeviction: it refuses every write
        REJECTED.labels("redis_out_of_memory").inc()
        log.warning("redis_out_of_memory", error=str(exc)[:200])
        raise Busy("the job queue is out of memory", headers={"Retry-After": str(retry_after)}) from exc
    except PoolExhausted as exc:  # this process's connections are all in use: load, not an outage
        REJECTED.labels("busy").inc()
        log.info("redis_pool_busy", error=str(exc))
        raise Busy(f"the gateway is busy ({exc}); retry later", headers=BUSY_RETRY_AFTER) from exc
    except RedisError as exc:
        log.warning("redis_unavailable", error=str(exc)[:200])
        raise UpstreamUnavailable("the job queue (redis) is unavailable") from exc


def queue_full(depth: int, settings: Settings) -> QueueFull:
    REJECTED.labels("queue_full").inc()
    return QueueFull(
        f"the LLM queue is full ({depth} jobs waiting); retry later",
        headers={"Retry-After": str(settings.retry_after_seconds)},
    )


async def check_queue(queue: JobQueue, settings: Settings) -> None:
    """Refuses before any work a question no worker would take in time: the queue is full, or (with
    RAG_REQUIRE_LLM_WORKERS) no LLM worker is live, as while the tier is scaled to zero."""
    with redis_errors():
        if settings.require_llm_workers:
            depth, live = await asyncio.gather(queue.depth(), queue.live_workers())
        else:
            depth, live = await queue.depth(), None
    if depth >= settings.max_queue_depth:
        raise queue_full(depth, settings)
    if live == 0:
        REJECTED.labels("no_workers").inc()
        raise UpstreamUnavailable(
            "no LLM worker is running (the LLM tier is scaled to zero or starting); retry later",
            headers={"Retry-After": str(settings.no_workers_retry_after_seconds)},
        )


@dataclass
class Retrieved:
    """A question searched: what the retriever found and the sources that passed the floor."""

    search: SearchResponse
    sources: list[Source]  # those above the floor, numbered [1].. in the prompt
    started: float  # perf_counter at arrival
    deadline: float  # wall clock: arrival plus RAG_ASK_TIMEOUT_SECONDS

    def total_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


async def retrieve(
    question: Question, settings: Settings, retriever: ServiceClient, request_id: str, queue: JobQueue | None = None
) -> Retrieved:
    """Validates, searches and applies the relevance floor. Given the queue (the question is to be answered),
    refuses first, before any work, when the queue is already full; ``admit`` bounds it exactly."""
    started = time.perf_counter()
    deadline = time.time() + settings.ask_timeout_seconds
    with tracer.start_as_current_span("validate"):
        check_question(question, settings)
        if queue is not None:
            await check_queue(queue, settings)
    payload: dict[str, Any] = {"query": question.text, "top_k": question.top_k, "filters": question.filters}
    with tracer.start_as_current_span("retrieve") as span:
        # A search only reads: safe to send again on a connection that dropped before its answer.
        search = await retriever.post(
            "/v1/search", payload, idempotent=True, request_id=request_id, model=SearchResponse
        )
        span.set_attribute("ragpod.retrieve.hits", len(search.hits))
    ASK_STAGE_SECONDS.labels("retrieve").observe(time.perf_counter() - started)
    sources = above_floor(search.hits, settings.min_relevance)
    return Retrieved(search=search, sources=sources, started=started, deadline=deadline)


async def admit(queue: JobQueue, job: Job, settings: Settings) -> None:
    """Enqueues the job unless RAG_MAX_QUEUE_DEPTH jobs wait, checked and added in one step in Redis,
    so the bound holds across any number of gateway replicas (the early depth check only saves work)."""
    with tracer.start_as_current_span("admit"), redis_errors(settings.retry_after_seconds):
        admission = await queue.enqueue(job, max_depth=settings.max_queue_depth)
    if not admission.admitted:
        raise queue_full(admission.depth, settings)


def embedder(embedding: EmbeddingClient, request_id: str) -> Embed:
    """Texts to vectors for attribution, from the embedding service (spilling to the CPU one)."""

    async def embed(texts: list[str]) -> list[list[float]]:
        return (await embedding.embed(texts, request_id)).vectors

    return embed


@dataclass(frozen=True)
class Token:
    """Text of the answer as it is generated."""

    text: str


@dataclass(frozen=True)
class Reset:
    """The answer starts over (a retried generation): what was shown of it is to be dropped."""

    attempt: int


@dataclass(frozen=True)
class Answer:
    """The answer to a question: the body /v1/ask answers, and what OpenAI's shape adds."""

    response: AskResponse
    finish_reason: str = "stop"  # "length" when the model ran out of tokens
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Pending:
    """A question retrieved and, unless no source passed the floor, queued: its answer, to wait for."""

    question: Question
    retrieved: Retrieved
    settings: Settings
    clients: Clients
    request_id: str
    job: Job | None = None  # None: not covered by the documents, nothing was queued
    sources_embedded: SourceSentences | None = None  # embedded with the question before the job; None if that failed
    admitted_ns: int = 0  # wall clock when the job was admitted: where the queue_wait span starts
    trace_context: otel_context.Context | None = None  # the question's span: the stage spans' parent

    async def answer(self) -> Answer:
        """The whole answer once the job is done; raises the ``RagError`` that ends it otherwise."""
        async for item in self.stream():
            if isinstance(item, Answer):
                return item
        raise GenerationFailed("the job's events ended without an answer")

    async def stream(self) -> AsyncIterator[Token | Reset | Answer]:
        """Tokens in order, ``Reset`` when a retry starts the answer over, then the ``Answer``.

        The answer shown is the one that comes last: when another attempt than the one streamed wins,
        a ``Reset`` and its whole text come before the ``Answer``."""
        if self.job is None:
            yield Token(NOT_COVERED)
            yield Answer(self._not_covered(self._timings(None)))
            return
        attempt = 0
        shown: list[str] = []
        async for event in self._follow(self.job):
            if event.type == "token":
                if event.attempt > attempt:  # a retry started over: the client drops what it has shown
                    if attempt:
                        yield Reset(event.attempt)
                        shown.clear()
                    attempt = event.attempt
                if event.attempt == attempt:
                    shown.append(str(event.data["text"]))
                    yield Token(shown[-1])
            elif event.type == "done":
                answer = await self._answered(event)
                text = answer.response.answer
                if "".join(shown).strip() != text:  # another attempt won, or the answer was cleaned or replaced
                    if shown or attempt:
                        yield Reset(max(event.attempt, attempt))
                    if text:
                        yield Token(text)
                yield answer
                return
            else:
                raise GenerationFailed(str(event.data.get("detail") or "generation failed"))

    async def _follow(self, job: Job) -> AsyncIterator[Event]:
        """The job's events until ``done`` or ``error``; raises DeadlineExceeded at the caller's deadline.

        Left before its end (the caller went away, its deadline passed, a failure), the job is marked abandoned:
        a worker does not start it, or stops generating it."""
        queue = self.clients.queue
        outage: list[RedisError | None] = [None]  # the last read's failure while Redis is unreachable

        def on_outage(error: RedisError | None) -> None:
            if error is not None and outage[0] is None:
                log.warning("follow_retrying", job_id=job.id, error=str(error)[:200])
            elif error is None and outage[0] is not None:
                log.info("follow_resumed", job_id=job.id)
            outage[0] = error

        ended = False
        try:
            with redis_errors():
                remaining = job.deadline - time.time()
                if remaining <= 0:
                    raise DeadlineExceeded("no answer before the deadline")
                try:
                    # Reads that cannot reach Redis are retried until the deadline (``JobQueue.events``).
                    async with asyncio.timeout(remaining):
                        async for event in queue.events(job.id, on_outage=on_outage):
                            ended = event.type in ("done", "error")
                            yield event
                            if ended:
                                return
                except TimeoutError:
                    if outage[0] is not None:  # Redis never came back: it, not the workers, is the cause
                        raise outage[0] from None
                    REJECTED.labels("deadline").inc()
                    raise DeadlineExceeded(
                        # The caller's deadline as configured, counted from arrival (not from the enqueue,
                        # which a slow retrieval delays).
                        f"no answer within the deadline of {self.settings.ask_timeout_seconds:g} s; "
                        "the job was dropped and will not be generated"
                    ) from None
        finally:
            if not ended:
                await abandon(queue, job.id)
            with contextlib.suppress(RedisError):
                await queue.discard(job.id)

    def _record_worker_stages(self, done: Event) -> None:
        """The job's ``queue_wait`` and ``generate`` spans, as the worker measured them (on Redis' clock), placed
        from the moment of admission to now."""
        if not self.admitted_ns or not tracing.enabled():
            return
        now = time.time_ns()
        waited = self.admitted_ns + int(float(done.data.get("queue_ms", 0.0)) * 1e6)
        generated = min(waited, now)
        for name, start, end in (("queue_wait", self.admitted_ns, generated), ("generate", generated, now)):
            span = tracer.start_span(name, context=self.trace_context, start_time=start)
            span.set_attribute("ragpod.worker", str(done.data.get("worker", "")))
            span.end(end_time=end)

    async def _answered(self, done: Event) -> Answer:
        """The model's answer cleaned and checked sentence by sentence against the sources, whose sentences were
        embedded before the job (again now if that failed; the answer's own sentences take one more call); when
        it does not pass, the quoted sentences of the sources that answer the question, or not covered."""
        self._record_worker_stages(done)
        with tracer.start_as_current_span("attribute", context=self.trace_context):
            return await self._checked(done)

    async def _checked(self, done: Event) -> Answer:
        cleaned = clean_answer(str(done.data.get("answer", "")), cut_off=done.data.get("finish_reason") == "length")
        started = time.perf_counter()
        embed = embedder(self.clients.embedding, self.request_id)
        text, min_support = cleaned.text, self.settings.min_support
        kind: AnswerKind = "generated"
        grounded: bool | None
        warnings: list[str] = []
        try:
            sources = self.sources_embedded
            if sources is None:
                sources = await embed_sources([s.text for s in self.retrieved.sources], embed, self.question.text)
            attribution = await attribute_to(text, sources, embed, min_support, self.question.text)
            passed = not cleaned.looped and attribution.grounded and bool(attribution.citations)
            if max(sources.question_support(), default=0.0) < self.settings.min_question_support:
                kind = "not_covered"
            elif not passed:
                quoted = extract(sources, self.settings.min_question_support)
                kind = "not_covered" if quoted is None else "extractive"
                if quoted is not None:
                    text = quoted
                    attribution = await attribute_to(quoted, sources, embed, min_support, self.question.text)
        except RagError as exc:
            if exc.status_code < 502:  # a 4xx or 500 from attribution is a bug, not a dependency's failure
                raise
            # Citations are an enrichment: the cleaned answer is kept, unchecked, rather than paid for again.
            ATTRIBUTION_SKIPPED.labels(exc.error).inc()
            log.warning("attribution_skipped", error=exc.error, detail=exc.detail[:200])
            attribution, grounded, passed = Attribution(), None, not cleaned.looped
            warnings.append(f"attribution skipped: {exc.detail}")
        else:
            grounded = attribution.grounded
        ASK_STAGE_SECONDS.labels("attribute").observe(time.perf_counter() - started)
        ANSWER_KINDS.labels(kind).inc()
        if not passed:
            UNGROUNDED.inc()
        log.info(
            "answer_checked",
            answer_kind=kind,
            sentences=len(attribution.citations),
            grounded=grounded,
            looped=cleaned.looped,
            model_passed=passed,
            warnings=len(attribution.warnings),
            attribute_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        if kind == "not_covered":
            response = self._not_covered(self._timings(done), str(done.data.get("model", "")))
        else:
            response = self._response(text, kind, attribution, grounded, warnings, done)
        return Answer(
            response,
            finish_reason="length" if done.data.get("finish_reason") == "length" else "stop",
            prompt_tokens=int(done.data.get("prompt_tokens", 0) or 0),
            completion_tokens=int(done.data.get("completion_tokens", 0) or 0),
        )

    def _response(
        self,
        text: str,
        kind: AnswerKind,
        attribution: Attribution,
        grounded: bool | None,
        warnings: list[str],
        done: Event,
    ) -> AskResponse:
        return AskResponse(
            answer=text,
            answer_kind=kind,
            sources=self.retrieved.sources,
            citations=attribution.citations,
            grounded=grounded,
            citation_warnings=attribution.warnings,
            warnings=warnings,
            timings=self._timings(done),
            model=str(done.data.get("model", "")),
        )

    @staticmethod
    def _not_covered(timings: Timings, model: str = "") -> AskResponse:
        return AskResponse(
            answer=NOT_COVERED, answer_kind="not_covered", sources=[], grounded=False, timings=timings, model=model
        )

    def _timings(self, done: Event | None) -> Timings:
        total = self.retrieved.total_ms()
        ASK_STAGE_SECONDS.labels("total").observe(total / 1000)
        data = done.data if done is not None else {}
        search = self.retrieved.search
        return Timings(
            embed_ms=round(search.embed_ms, 2),
            search_ms=round(search.search_ms, 2),
            queue_ms=round(float(data.get("queue_ms", 0.0)), 2),
            generate_ms=round(float(data.get("generate_ms", 0.0)), 2),
            total_ms=round(total, 2),
        )


_abandoning: set[asyncio.Task[bool]] = set()  # marks still being written, kept from the garbage collector


async def abandon(queue: JobQueue, job_id: str) -> None:
    """Marks a job abandoned; the mark is written even when the caller's task is being cancelled (a client
    that went away), in a task of its own that this one waits for unless it is cancelled itself."""
    task = asyncio.ensure_future(queue.abandon(job_id))
    _abandoning.add(task)
    task.add_done_callback(_abandoning.discard)
    task.add_done_callback(_abandon_logged(job_id))
    with contextlib.suppress(RedisError):
        await asyncio.shield(task)


def _abandon_logged(job_id: str) -> Callable[[asyncio.Task[bool]], None]:
    def logged(task: asyncio.Task[bool]) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            log.warning("job_abandon_failed", job_id=job_id, error=str(task.exception())[:200])
        elif task.result():
            log.info("job_abandoned", job_id=job_id)

    return logged


async def ask(question: Question, settings: Settings, clients: Clients, request_id: str) -> Pending:
    """Retrieves, and unless no source passes the floor, queues one job for the answer and starts embedding
    the sources' sentences for attribution. Refusals (bad input, a full queue, a dependency down) are raised
    here, before a route starts its answer."""
    retrieved = await retrieve(question, settings, clients.retriever, request_id, clients.queue)
    pending = Pending(question, retrieved, settings, clients, request_id)
    if not retrieved.sources:
        UNANSWERED.inc()
        hits = retrieved.search.hits
        best = max((hit.score for hit in hits), default=None)
        log.info("ask_not_covered", hits=len(hits), best_score=best, min_relevance=settings.min_relevance)
        return pending
    embedded = await _embed_for_prompt(question, retrieved.sources, clients.embedding, request_id)
    context = None if embedded is None else select_context(embedded, settings.max_context_chars)
    messages = build_messages(
        question.text,
        retrieved.sources,
        settings.max_context_chars,
        settings.system_prompt,
        question.conversation,
        context,
    )
    job = Job(
        messages=messages,
        deadline=retrieved.deadline,
        timeout_s=retrieved.deadline - time.time(),  # the caller's budget from now; workers count it on Redis' clock
        stream=question.stream,
        max_tokens=question.max_tokens,
        temperature=question.temperature,
        request_id=request_id,
    )
    admitted_ns = time.time_ns()
    await admit(clients.queue, job, settings)
    pending.admitted_ns, pending.trace_context = admitted_ns, otel_context.get_current()
    pending.job, pending.sources_embedded = job, embedded
    log.info("question_queued", job_id=job.id, sources=len(retrieved.sources), chars=len(question.text))
    return pending


async def _embed_for_prompt(
    question: Question, sources: list[Source], embedding: EmbeddingClient, request_id: str
) -> SourceSentences | None:
    """The sources' sentences and the question, embedded in one call; None when the embedding service is busy or
    down (the prompt then carries each source from its start, and the answer's check tries the call again)."""
    started = time.perf_counter()
    try:
        embedded = await embed_sources([s.text for s in sources], embedder(embedding, request_id), question.text)
    except (RagError, ValueError) as exc:
        log.info("context_selection_skipped", error=str(exc)[:200])
        return None
    ASK_STAGE_SECONDS.labels("select").observe(time.perf_counter() - started)
    return embedded
