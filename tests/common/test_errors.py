"""One error shape on every status, Starlette's own included; a bug is a 500 naming the request id, never a trace."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from pydantic import BaseModel

from services.common.app import OK, Checks, add_common_routes
from services.common.errors import BY_STATUS, DimensionMismatch, Internal, RagError


class Body(BaseModel):
    n: int


def app_with(routes: FastAPI) -> TestClient:
    async def ready() -> Checks:
        return {"self": OK}

    add_common_routes(routes, "test", ready)
    return TestClient(routes, raise_server_exceptions=False)


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()

    @app.post("/items")
    async def items(body: Body) -> dict[str, int]:
        return {"n": body.n}

    @app.get("/boom")
    async def boom() -> None:
        raise KeyError("a bug")

    @app.get("/too-large")
    async def too_large() -> None:
        raise HTTPException(413)

    @app.get("/teapot")
    async def teapot() -> None:
        raise HTTPException(418, "short and stout")

    return app_with(app)


def test_unknown_route_is_404_in_the_shape(client: TestClient) -> None:
    response = client.get("/nowhere")
    assert (response.status_code, response.json()) == (404, {"error": "not_found", "detail": "no such route"})


def test_wrong_method_is_405_in_the_shape_with_allow(client: TestClient) -> None:
    response = client.get("/items")
    assert response.status_code == 405
    assert response.json() == {"error": "method_not_allowed", "detail": "method not allowed on this route"}
    assert response.headers["allow"] == "POST"


def test_starlette_errors_keep_their_status_in_the_shape(client: TestClient) -> None:
    assert client.get("/too-large").json() == {"error": "payload_too_large", "detail": "request body too large"}
    teapot = client.get("/teapot")
    assert (teapot.status_code, teapot.json()) == (400, {"error": "bad_request", "detail": "short and stout"})


def test_validation_names_the_field(client: TestClient) -> None:
    response = client.post("/items", json={"n": "many"})
    assert response.status_code == 422
    assert response.json()["error"] == "validation_error" and response.json()["detail"].startswith("n:")


def test_an_unexpected_exception_is_500_naming_the_request_id_without_its_trace(client: TestClient) -> None:
    response = client.get("/boom", headers={"x-request-id": "bug-17"})
    assert response.status_code == 500
    assert response.json() == {
        "error": "internal_error",
        "detail": "the service failed on this request (request id bug-17); it has been logged",
    }
    assert response.headers["x-request-id"] == "bug-17"
    assert "KeyError" not in response.text and "a bug" not in response.text
    metrics = client.get("/metrics").text
    assert 'route="/boom",service="test",status="500"' in metrics


def test_every_status_has_its_own_class_and_only_a_bug_is_a_500() -> None:
    for status, cls in BY_STATUS.items():
        assert cls.status_code == status
    classes = list(RagError.__subclasses__())
    assert [cls for cls in [RagError, *classes] if cls.status_code == 500] == [Internal]


def test_a_dimension_mismatch_names_both_sizes() -> None:
    error = DimensionMismatch(768, 384, collection="ragpod")
    assert error.status_code == 503 and error.error == "dimension_mismatch"
    assert "768" in error.detail and "384" in error.detail and "'ragpod'" in error.detail
