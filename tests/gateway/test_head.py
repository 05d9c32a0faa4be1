"""HEAD on the gateway's GET routes: GET's status and headers, no body; a route without GET still says 405."""

from __future__ import annotations

import pytest

from tests.gateway.conftest import Gateway


@pytest.mark.parametrize("path", ["/", "/healthz", "/readyz", "/metrics", "/v1/models", "/v1/status", "/openapi.json"])
async def test_head_answers_what_get_answers_without_the_body(gateway: Gateway, path: str) -> None:
    get = await gateway.client.get(path)
    head = await gateway.client.head(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if "content-length" in get.headers and path != "/metrics":  # /metrics changes between the two calls
        assert head.headers["content-length"] == get.headers["content-length"]


async def test_head_of_an_unknown_document_is_404_and_of_a_post_route_405(gateway: Gateway) -> None:
    assert (await gateway.client.head("/v1/models/other")).status_code == 404
    refused = await gateway.client.head("/v1/ask")
    assert refused.status_code == 405 and refused.content == b""
