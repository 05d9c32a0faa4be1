"""A real Prometheus scrapes the running services and evaluates the autoscalers' own queries.

The queries are the prometheus-adapter rules rendered from ``deploy/k8s``
(gpu-cluster overlay), expanded the way the adapter expands them for a pods
metric of a HorizontalPodAutoscaler. Scrape targets carry the ``namespace`` and
``pod`` labels that the Prometheus operator adds in a cluster.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ragpod.processes import Proc, free_port, spawn, wait_until
from ragpod.supervisor import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "rag-production"


def rendered(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return rendered("gpu-cluster")


@pytest.fixture(scope="module")
def adapter_rules(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    (config,) = [m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"] == "ragpod-adapter-rules"]
    rules = yaml.safe_load(config["data"]["config.yaml"])["rules"]
    return {rule["name"]["as"]: rule for rule in rules}


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is needed (.ci/run installs it)"
    work = tmp_path_factory.mktemp("prometheus")
    scrape = [
        {
            "job_name": name,
            "scrape_interval": "1s",
            "static_configs": [
                {"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": NAMESPACE, "pod": f"{name}-0"}}
            ],
        }
        for name, port in stack.ports.items()
    ]
    (work / "prometheus.yml").write_text(
        yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": scrape})
    )
    port = free_port()
    proc: Proc = spawn(
        "prometheus",
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        {},
        work,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 30, "prometheus", proc)
        yield url
    finally:
        proc.stop()


def expand(rule: dict[str, Any], pod: str) -> str:
    """The query prometheus-adapter sends for one pod of an HPA's pods metric."""
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)  # type: ignore[union-attr]
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{pod}"')
        .replace("<<.GroupBy>>", "pod")
    )


def query(url: str, promql: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def eventually(url: str, promql: str, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        result = query(url, promql)
        if result or time.monotonic() > deadline:
            return result
        time.sleep(1)


def drive_traffic(stack: Stack) -> None:
    """Requests over a few scrapes, so rate() has points to work with."""
    gateway = f"http://127.0.0.1:{stack.ports['gateway']}"
    retriever = f"http://127.0.0.1:{stack.ports['retriever']}"
    with httpx.Client(timeout=30) as client:
        for _ in range(3):
            for _ in range(10):
                assert client.post(f"{gateway}/v1/ask", json={"question": " "}).status_code == 422
                assert (
                    client.post(f"{retriever}/v1/search", json={"query": "moon tides", "top_k": 2}).status_code == 200
                )
            time.sleep(1.5)


def test_every_hpa_pods_metric_has_an_adapter_rule(
    manifests: list[dict[str, Any]], adapter_rules: dict[str, dict[str, Any]]
) -> None:
    wanted = {
        metric["pods"]["metric"]["name"]
        for hpa in manifests
        if hpa["kind"] == "HorizontalPodAutoscaler"
        for metric in hpa["spec"]["metrics"]
        if metric["type"] == "Pods"
    }
    assert wanted  # the design scales on request rate, p99 latency and GPU use
    assert wanted <= set(adapter_rules)


def test_prometheus_evaluates_the_hpa_queries_on_the_services_own_series(
    stack: Stack, prometheus: str, adapter_rules: dict[str, dict[str, Any]]
) -> None:
    wait_until(lambda: len(query(prometheus, "up == 1")) == len(stack.ports), 30, "first scrape of every service")
    drive_traffic(stack)

    rate = eventually(prometheus, expand(adapter_rules["rag_http_requests_per_second"], "gateway-0"))
    assert [r["metric"]["pod"] for r in rate] == ["gateway-0"]
    assert float(rate[0]["value"][1]) > 0

    p99 = eventually(prometheus, expand(adapter_rules["rag_http_request_duration_p99_seconds"], "retriever-0"))
    assert [r["metric"]["pod"] for r in p99] == ["retriever-0"]
    assert 0 < float(p99[0]["value"][1]) < 10

    # No GPU on this machine: the query is valid and finds no series (an idle or CPU pod has no value).
    assert query(prometheus, expand(adapter_rules["rag_gpu_utilization_ratio"], "embedding-0")) == []

    depth = eventually(prometheus, f'max(rag_llm_queue_depth{{namespace="{NAMESPACE}"}})')
    assert float(depth[0]["value"][1]) >= 0


DASHBOARD = ROOT / "deploy" / "compose" / "grafana" / "provisioning" / "dashboards" / "ragpod.json"
GPU_ONLY = {"rag_gpu_utilization_ratio", "rag_gpu_memory_used_bytes", "rag_gpu_memory_total_bytes"}


def dashboard_queries() -> list[str]:
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def exported_names(stack: Stack) -> set[str]:
    """Every series name the services declare (from the TYPE lines, so series not yet used count too)."""
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    names: set[str] = set()
    for port in stack.ports.values():
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                names.update(name + suffix for suffix in suffixes.get(kind, ("",)))
    return names


def test_the_dashboard_names_only_series_the_services_export(stack: Stack) -> None:
    exported = exported_names(stack)
    assert exported >= GPU_ONLY  # declared everywhere, set only where a GPU is present
    used = {name for expr in dashboard_queries() for name in re.findall(r"\brag_[a-z0-9_]+", expr)}
    assert used and used <= exported, used - exported


def test_prometheus_evaluates_every_dashboard_query(stack: Stack, prometheus: str) -> None:
    wait_until(lambda: len(query(prometheus, "up == 1")) == len(stack.ports), 30, "first scrape of every service")
    drive_traffic(stack)
    answered = 0
    for expr in dashboard_queries():
        result = query(prometheus, expr.replace("$__rate_interval", "1m"))  # asserts Prometheus accepted it
        answered += bool(result)
    assert answered >= len(dashboard_queries()) // 2  # most panels have data once the stack has served requests
