"""The tracing component: the standard OTEL_* variables in each service's ConfigMap, and the one way out to the
collector; without it no service exports anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.manifests import all_containers
from tests.fixtures import k8s_manifests as k8s

SERVICES = ("gateway", "retriever", "embedding", "llm")


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_tracing_is_off_without_the_component(renders: dict[str, k8s.Render], overlay: str) -> None:
    render = renders[overlay]
    for config in render.all("ConfigMap"):
        assert not any(key.startswith("OTEL_") for key in config.get("data", {})), config["metadata"]["name"]
    assert render.find("NetworkPolicy", "allow-otel-collector") is None


@pytest.mark.parametrize("overlay", ["gpu-cluster", "cpu-only"])
def test_the_component_turns_tracing_on_for_every_service(tmp_path: Path, overlay: str) -> None:
    render = k8s.with_components(tmp_path, overlay, "tracing")
    for service in SERVICES:
        data = render.get("ConfigMap", f"{service}-config")["data"]
        assert data["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4318")
        assert data["OTEL_SERVICE_NAME"] == service
    # Every pod of the four services reads its ConfigMap whole, so the variables reach the process.
    for deployment in render.all("Deployment"):
        name = deployment["metadata"]["labels"].get("app.kubernetes.io/name")
        if name not in SERVICES:
            continue
        refs = {
            source["configMapRef"]["name"]
            for container in all_containers(deployment["spec"]["template"]["spec"])
            for source in container.get("envFrom", [])
            if "configMapRef" in source
        }
        assert f"{name}-config" in refs, deployment["metadata"]["name"]
    policy = render.get("NetworkPolicy", "allow-otel-collector")
    selector = policy["spec"]["podSelector"]["matchExpressions"][0]
    assert selector["key"] == "app.kubernetes.io/name" and set(selector["values"]) == set(SERVICES)
    assert policy["spec"]["policyTypes"] == ["Egress"]
    (rule,) = policy["spec"]["egress"]
    assert rule["ports"] == [{"port": 4318, "protocol": "TCP"}]
    (peer,) = rule["to"]
    assert "ipBlock" not in peer, "the collector's pods only, not an address range"
