"""The embedding client sends to the GPU embedding service and spills to the CPU one on a 503, a timeout or a
refused connection, and on nothing else."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client import REGISTRY

from services.common.embedding import EmbeddingClient
from services.common.errors import RagError, UpstreamError, UpstreamUnavailable
from services.common.http import ServiceClient
from services.embedding.model import Embedder


def spilled(reason: str | None = None) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "rag_embedding_spill":
            for sample in metric.samples:
                if sample.name.endswith("_total") and reason in (None, sample.labels["reason"]):
                    total += sample.value
    return total


class Model:
    """An embedding service in-process: the real model, or an outage of one kind."""

    def __init__(self, embedder: Embedder, name: str) -> None:
        self.embedder = embedder
        self.name = name
        self.fail: str | None = None
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.fail == "saturated":
            return httpx.Response(503, json={"error": "overloaded", "detail": "too many texts waiting"})
        if self.fail == "bug":
            self.calls += 1
            return httpx.Response(500, json={"error": "internal_error", "detail": "the service failed"})
        if self.fail == "bad gateway":
            self.calls += 1
            return httpx.Response(502, json={"error": "upstream_error", "detail": "something below failed"})
        if self.fail == "invalid":
            self.calls += 1
            return httpx.Response(422, json={"error": "validation_error", "detail": "texts.0: must not be blank"})
        if self.fail == "timeout":
            raise httpx.ReadTimeout("no answer", request=request)
        if self.fail == "refused":
            raise httpx.ConnectError("connection refused", request=request)
        self.calls += 1
        texts = json.loads(request.content)["texts"]
        vectors = self.embedder.encode(texts)
        return httpx.Response(200, json={"vectors": vectors, "model": self.name, "dimension": 384, "device": "cpu"})


def pair(embedder: Embedder, cooldown: float = 0.0) -> tuple[EmbeddingClient, Model, Model]:
    gpu, cpu = Model(embedder, "gpu"), Model(embedder, "cpu")
    client = EmbeddingClient(
        ServiceClient("embedding", "http://gpu", 5, transport=httpx.MockTransport(gpu)),
        ServiceClient("embedding-cpu", "http://cpu", 5, transport=httpx.MockTransport(cpu)),
        cooldown_seconds=cooldown,
    )
    return client, gpu, cpu


@pytest.mark.parametrize("failure", ["saturated", "timeout", "refused"])
async def test_each_kind_of_failure_spills_to_the_cpu_service(embedder: Embedder, failure: str) -> None:
    client, gpu, cpu = pair(embedder)
    try:
        before = spilled()
        gpu.fail = failure
        embedded = await client.embed(["a question"])
        assert embedded.model == "cpu" and cpu.calls == 1
        assert spilled() == before + 1
        gpu.fail = None
        assert (await client.embed(["a question"])).model == "gpu"  # back at once with no cooldown
        assert spilled() == before + 1
    finally:
        await client.aclose()


async def test_after_a_refused_connection_the_gpu_service_rests_for_the_cooldown(embedder: Embedder) -> None:
    client, gpu, cpu = pair(embedder, cooldown=3600)
    try:
        gpu.fail = "refused"
        await client.embed(["one"])
        gpu.fail = None
        assert (await client.embed(["two"])).model == "cpu"  # not even tried: no timeout paid again
        assert gpu.calls == 0
    finally:
        await client.aclose()


async def test_a_503_does_not_start_a_cooldown(embedder: Embedder) -> None:
    client, gpu, _ = pair(embedder, cooldown=3600)
    try:
        gpu.fail = "saturated"
        await client.embed(["one"])
        gpu.fail = None
        assert (await client.embed(["two"])).model == "gpu"
    finally:
        await client.aclose()


async def test_without_a_cpu_service_the_error_names_the_embedding_service(embedder: Embedder) -> None:
    gpu = Model(embedder, "gpu")
    gpu.fail = "refused"
    client = EmbeddingClient(ServiceClient("embedding", "http://gpu", 5, transport=httpx.MockTransport(gpu)))
    try:
        with pytest.raises(UpstreamUnavailable, match="embedding is unavailable"):
            await client.embed(["one"])
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("failure", "raised"),
    [("bug", UpstreamError), ("bad gateway", UpstreamUnavailable), ("invalid", RagError)],
)
async def test_a_500_a_502_or_a_4xx_is_not_spilled(embedder: Embedder, failure: str, raised: type[RagError]) -> None:
    client, gpu, cpu = pair(embedder, cooldown=3600)
    try:
        before = spilled()
        gpu.fail = failure
        with pytest.raises(raised) as caught:
            await client.embed(["a question"])
        assert caught.value.upstream_status == {"bug": 500, "bad gateway": 502, "invalid": 422}[failure]
        assert (gpu.calls, cpu.calls) == (1, 0)  # the same texts were not sent again anywhere
        assert spilled() == before
        gpu.fail = None
        assert (await client.embed(["a question"])).model == "gpu"  # and no cooldown was started
    finally:
        await client.aclose()
