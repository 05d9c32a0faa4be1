"""make kube-smoke runs the rendered cpu-only overlay under podman kube play, bridged for one host
(scripts/kube_smoke.py). These tests hold the bridge to what it says: it changes only addresses, Redis's
Sentinel and the store, sends every ConfigMap and Secret the pods read, and runs a native sidecar as an
ordinary container (podman 4.3 refuses init containers that carry probes)."""

from __future__ import annotations

import copy
import importlib
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from tests.deploy.test_compose import REPO


@pytest.fixture(scope="module")
def kube_smoke() -> Iterator[ModuleType]:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        yield importlib.import_module("kube_smoke")
    finally:
        sys.path.remove(str(REPO / "scripts"))


@pytest.fixture(scope="module")
def rendered(kube_smoke: ModuleType) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = kube_smoke.render()
    return docs


def bridged(kube_smoke: ModuleType, docs: list[dict[str, Any]], **kwargs: bool) -> tuple[Any, Any, list[str]]:
    notes: list[str] = []
    out, secrets = kube_smoke.bridge(copy.deepcopy(docs), notes, embedded_qdrant=kwargs.get("qdrant", True))
    return out, secrets, notes


def test_the_pods_reach_each_other_by_pod_name_and_nothing_else_changes(
    kube_smoke: ModuleType, rendered: list[dict[str, Any]]
) -> None:
    out, secrets, notes = bridged(kube_smoke, rendered)
    before = {d["metadata"]["name"]: d["data"] for d in rendered if d["kind"] == "ConfigMap"}
    maps = {d["metadata"]["name"]: d["data"] for d in out if d["kind"] == "ConfigMap"}
    changed = []
    for name, data in maps.items():
        for key, value in data.items():
            old = before[name].get(key)
            if value == old:
                continue
            changed.append(key)
            if key == "RAG_REDIS_SENTINELS":
                assert value == ""
            elif key.startswith("RAG_QDRANT_"):
                continue  # the next test
            else:
                service = next(s for s in kube_smoke.DEPLOYMENTS if f"//{s}:" in old)
                assert value == old.replace(f"//{service}:", f"//{service}-pod-0:"), (name, key)
            assert not any(f"//{s}:" in value for s in kube_smoke.DEPLOYMENTS), (name, key, value)
    assert {"RAG_EMBEDDING_URL", "RAG_RETRIEVER_URL", "RAG_REDIS_SENTINELS"} <= set(changed)
    assert len(notes) == len(changed) - 1 + len(secrets), notes  # each change printed (Qdrant: one note)
    assert secrets == {"redis-auth": {"url": "redis://redis-pod-0:6379/0"}}


def test_every_configmap_a_pod_reads_is_sent(kube_smoke: ModuleType, rendered: list[dict[str, Any]]) -> None:
    out, secrets, _ = bridged(kube_smoke, rendered)
    deployments = {d["metadata"]["name"]: d for d in out if d["kind"] == "Deployment"}
    assert sorted(deployments) == sorted(kube_smoke.DEPLOYMENTS)
    sent = {d["metadata"]["name"] for d in out if d["kind"] == "ConfigMap"}
    assert kube_smoke.referenced(deployments, "configMap") <= sent
    # Secrets left out are those the manifests mark optional.
    for deployment in deployments.values():
        for ctr in kube_smoke.containers(deployment):
            for source in ctr.get("envFrom") or []:
                if "secretRef" in source and source["secretRef"]["name"] not in secrets:
                    assert source["secretRef"].get("optional") is True, source
            for env in ctr.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ref["name"] not in secrets:
                    assert ref.get("optional") is True, env


def test_the_embedded_store_only_where_the_qdrant_image_is_missing(
    kube_smoke: ModuleType, rendered: list[dict[str, Any]]
) -> None:
    with_server, _, _ = bridged(kube_smoke, rendered, qdrant=False)
    embedded, _, _ = bridged(kube_smoke, rendered, qdrant=True)

    def retriever(docs: list[dict[str, Any]]) -> dict[str, str]:
        data: dict[str, str] = next(d for d in docs if d["metadata"]["name"] == "retriever-config")["data"]
        return data

    assert retriever(with_server)["RAG_QDRANT_URL"].startswith("http://qdrant")
    assert retriever(embedded)["RAG_QDRANT_URL"] == ""
    assert retriever(embedded)["RAG_QDRANT_PATH"].startswith("/tmp/")  # the pod's writable emptyDir


def test_a_native_sidecar_runs_as_an_ordinary_container(kube_smoke: ModuleType, rendered: list[dict[str, Any]]) -> None:
    docs = copy.deepcopy(rendered)
    llm = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "llm")
    spec = llm["spec"]["template"]["spec"]
    server = spec["containers"].pop(1)
    spec["initContainers"] = [{**server, "restartPolicy": "Always"}]
    out, _, notes = bridged(kube_smoke, docs)
    spec = next(d for d in out if d["metadata"]["name"] == "llm")["spec"]["template"]["spec"]
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == [server["name"], "worker"]
    assert "restartPolicy" not in spec["containers"][0]
    assert any("sidecar" in note for note in notes)
