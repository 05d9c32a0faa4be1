"""schemathesis against the gateway's own OpenAPI document: every route, a bounded number of examples.

Every dependency is up (a real Redis, a worker, a real retriever with its store and the real embedding
model; the LLM is a scripted engine so that hundreds of cases run in seconds) and the queue limit is out
of any case's reach. Every response must be documented (status, content type, body schema) and none may
be a 5xx.
"""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis
import pytest
import schemathesis
from schemathesis.generation import GenerationMode
from schemathesis.schemas import APIOperation, BaseSchema
from schemathesis.specs.openapi.checks import positive_data_acceptance

from services.embedding.model import Embedder
from tests.fixtures.gateway_stack import InThread
from tests.fixtures.redis import RedisServer

MAX_EXAMPLES = 30
# Not checked: that every schema-valid request is accepted. Some limits are settings (RAG_TOP_K_MAX) or
# rules across fields (the last message of a chat is the user's), which answer a documented 422.


@pytest.fixture(scope="module")
def gateway_url(
    redis_server: RedisServer, embedder: Embedder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    with InThread(redis_server.url, embedder, tmp_path_factory.mktemp("fuzz")) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(gateway_url: str) -> BaseSchema:
    return schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")


def run_operation(operation: APIOperation, mode: GenerationMode) -> None:
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        derandomize=True,
        database=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance])

    check()


def describe(exc: BaseException) -> list[str]:
    """One line per distinct failure: what was wrong, and the request that showed it (cut short)."""
    if isinstance(exc, BaseExceptionGroup):
        where = " ".join(str(exc).split("\n\n", 1)[-1].split())
        return [line + " | " + where[-700:] for inner in exc.exceptions for line in describe(inner)]
    text = " ".join(str(exc).split())
    return [f"{type(exc).__name__}: {text[:600]}"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_route_holds_against_generated_input(api_schema: BaseSchema, mode: GenerationMode) -> None:
    """Valid input (positive) and input the schema forbids (negative): never a 5xx, never an undocumented answer."""
    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        try:
            run_operation(operation, mode)
        except hypothesis.errors.Unsatisfiable:
            pass  # nothing of this route can break the schema (no parameters, or only strings in the path)
        except (Exception, BaseExceptionGroup) as exc:  # every route's failures, not only the first route's
            failures.extend(f"{operation.method.upper()} {operation.path}: {line}" for line in describe(exc))
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


def test_the_schema_covers_every_route(api_schema: BaseSchema) -> None:
    paths = set(api_schema.raw_schema["paths"])
    assert {
        "/v1/ask",
        "/v1/search",
        "/v1/documents",
        "/v1/documents/{document_id}",
        "/v1/files",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/status",
    } <= paths
    models = api_schema.raw_schema["components"]["schemas"]
    # The limits this gateway enforces (settings) are in the schema: the defaults here.
    assert models["SearchQuery"]["properties"]["top_k"]["maximum"] == 20
    assert models["AskRequest"]["properties"]["question"]["maxLength"] == 2000
    assert models["DocumentsRequest"]["properties"]["documents"]["maxItems"] == 256
