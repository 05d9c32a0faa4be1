"""A real Prometheus scrapes the running services and evaluates the autoscalers' own queries.

The queries are the prometheus-adapter rules and the KEDA triggers rendered
from ``deploy/k8s`` (gpu-cluster overlay), expanded the way the adapter
expands them for a pods metric of a HorizontalPodAutoscaler. Scrape targets
carry what the Prometheus operator gives them in a cluster: ``namespace`` and
``pod``, and for a ServiceMonitor a ``service`` target label (the Kubernetes
Service's name) followed by the monitor's own relabelings.
"""

from __future__ import annotations

import math
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml

from deploy.manifests import K8S_DIR, render
from ragpod.processes import Proc, free_port, spawn, wait_until
from ragpod.supervisor import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = K8S_DIR.parents[1]
NAMESPACE = "rag-production"
# The Kubernetes Service in front of each local process, where a ServiceMonitor scrapes it. The
# embedding process stands for a GPU pod: its Service's name differs from the series' own
# "service" label, which the monitor must leave alone. The LLM pods are scraped by a PodMonitor.
SCRAPED_AS = {"gateway": "gateway", "embedding": "embedding-gpu", "retriever": "retriever"}


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return render(K8S_DIR / "overlays" / "gpu-cluster")


def find(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


@pytest.fixture(scope="module")
def adapter_rules(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    config = find(manifests, "ConfigMap", "ragpod-adapter-rules")
    rules = yaml.safe_load(config["data"]["config.yaml"])["rules"]
    return {rule["name"]["as"]: rule for rule in rules}


def relabel_configs(monitor: dict[str, Any]) -> list[dict[str, Any]]:
    """A ServiceMonitor endpoint's relabelings as Prometheus relabel_configs (the operator's translation)."""
    (endpoint,) = monitor["spec"]["endpoints"]
    configs = []
    for relabeling in endpoint.get("relabelings", []):
        configs.append({re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), k): v for k, v in relabeling.items()})
    return configs


@dataclass
class Prometheus:
    url: str
    idle_at: float  # a moment after two scrapes of every service and before any request of this module


@pytest.fixture(scope="module")
def prometheus(
    stack: Stack, manifests: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is needed (.ci/run installs it)"
    work = tmp_path_factory.mktemp("prometheus")
    scrape = []
    for name, port in stack.ports.items():
        labels = {"namespace": NAMESPACE, "pod": f"{name}-0"}
        job: dict[str, Any] = {"job_name": name, "scrape_interval": "1s"}
        if name in SCRAPED_AS:
            labels["service"] = SCRAPED_AS[name]
            job["relabel_configs"] = relabel_configs(find(manifests, "ServiceMonitor", name))
        job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"], "labels": labels}]
        scrape.append(job)
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
        wait_until(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 120, "prometheus", proc)
        # Two scrapes of every service, so that rate() has two points to compare.
        scraped = f'count(count_over_time(up{{namespace="{NAMESPACE}"}}[1m]) >= 2)'
        wait_until(
            lambda: [float(r["value"][1]) for r in query(url, scraped)] == [len(stack.ports)],
            60,
            "two scrapes of every service",
        )
        yield Prometheus(url, time.time())
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


def query(url: str, promql: str, at: float | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"query": promql}
    if at is not None:
        params["time"] = at
    body = httpx.get(f"{url}/api/v1/query", params=params, timeout=10).json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def per_pod(result: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"]["pod"]: float(r["value"][1]) for r in result}


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


def load_embedding(stack: Stack, clients: int, seconds: float) -> int:
    """Concurrent embed requests for a while, over several scrapes; returns how many were answered."""
    url = f"http://127.0.0.1:{stack.ports['embedding']}/v1/embed"
    stop = time.monotonic() + seconds
    answered: list[int] = []
    failures: list[str] = []

    def client(n: int) -> None:
        done = 0
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < stop:
                texts = [f"load {n} {done} {i}: how far is the moon from the earth" for i in range(8)]
                response = http.post(url, json={"texts": texts})
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")
                    return
                done += 1
        answered.append(done)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    return sum(answered)


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
    # The gateway scales on its request rate, embedding on its requests in flight and batch wait (the
    # retriever on its own CPU, a Resource metric).
    assert wanted == {
        "rag_http_requests_per_second",
        "rag_embedding_requests_in_flight",
        "rag_embedding_batch_wait_p95_seconds",
    }
    assert wanted <= set(adapter_rules)


# Which pod each HPA's metric is asked for.
POD_OF = {
    "rag_http_requests_per_second": "gateway-0",
    "rag_embedding_requests_in_flight": "embedding-0",
    "rag_embedding_batch_wait_p95_seconds": "embedding-0",
}


def test_an_idle_pod_reads_zero_on_every_hpa_metric(
    prometheus: Prometheus, adapter_rules: dict[str, dict[str, Any]]
) -> None:
    """No traffic in the window: each pod has the value 0 (no value would freeze the HPA's scale-down)."""
    for name, pod in POD_OF.items():
        values = per_pod(query(prometheus.url, expand(adapter_rules[name], pod), at=prometheus.idle_at))
        assert values == {pod: 0.0}, name


def test_prometheus_evaluates_the_hpa_queries_on_the_services_own_series(
    stack: Stack, prometheus: Prometheus, adapter_rules: dict[str, dict[str, Any]]
) -> None:
    drive_traffic(stack)

    rate = per_pod(eventually(prometheus.url, expand(adapter_rules["rag_http_requests_per_second"], "gateway-0")))
    assert list(rate) == ["gateway-0"] and rate["gateway-0"] > 0


def test_prometheus_evaluates_the_embedding_hpa_queries_under_load(
    stack: Stack, prometheus: Prometheus, adapter_rules: dict[str, dict[str, Any]]
) -> None:
    # Eight clients, each with a request always in flight, over several one-second scrapes.
    started = time.time()
    assert load_embedding(stack, clients=8, seconds=8) > 0
    in_flight_rule = expand(adapter_rules["rag_embedding_requests_in_flight"], "embedding-0")
    wait_rule = expand(adapter_rules["rag_embedding_batch_wait_p95_seconds"], "embedding-0")
    # Evaluated as the adapter would have during the load (its window reaches back one minute).
    during = started + 7
    in_flight = per_pod(query(prometheus.url, in_flight_rule, at=during))
    assert list(in_flight) == ["embedding-0"] and 0 < in_flight["embedding-0"] <= 8
    wait = per_pod(query(prometheus.url, wait_rule, at=during))
    assert list(wait) == ["embedding-0"] and 0 < wait["embedding-0"] < 10
    # The series the rules read are the service's own, scraped from the one pod.
    samples = query(prometheus.url, f'rag_embedding_requests_in_flight{{namespace="{NAMESPACE}"}}', at=during)
    assert [s["metric"]["pod"] for s in samples] == ["embedding-0"]


def test_keda_reads_the_queue_depth_and_jobs_in_flight_the_workers_export(
    stack: Stack, prometheus: Prometheus, manifests: list[dict[str, Any]]
) -> None:
    scaled = find(manifests, "ScaledObject", "llm")
    prometheus_triggers = [t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    assert len(prometheus_triggers) == 2  # besides them, only the cron window of the peak hours
    for trigger in prometheus_triggers:
        # KEDA treats an empty answer as an error (ignoreNullValues false): every query must find the series.
        (sample,) = eventually(prometheus.url, trigger["metadata"]["query"])
        value = float(sample["value"][1])
        assert math.isfinite(value) and value == int(value), trigger["name"]
        direct = query(prometheus.url, re.sub(r"^\w+\((.*)\)$", r"\1", trigger["metadata"]["query"]))
        assert [s["metric"]["pod"] for s in direct] == ["llm-0"], trigger["name"]


def test_the_series_keep_their_own_service_label_under_a_service_monitor(stack: Stack, prometheus: Prometheus) -> None:
    """The operator's "service" target label would rename the series' own to exported_service."""
    drive_traffic(stack)
    with httpx.Client(timeout=30) as client:
        embed = client.post(f"http://127.0.0.1:{stack.ports['embedding']}/v1/embed", json={"texts": ["tides"]})
        assert embed.status_code == 200
    found = eventually(prometheus.url, f'rag_http_requests_total{{namespace="{NAMESPACE}",pod="embedding-0"}}')
    assert found and {s["metric"]["service"] for s in found} == {"embedding"}
    assert query(prometheus.url, 'count({exported_service!=""})') == []


DASHBOARD = ROOT / "deploy" / "compose" / "grafana" / "provisioning" / "dashboards" / "ragpod.json"
GPU_ONLY = {"rag_gpu_utilization_ratio", "rag_gpu_memory_used_bytes", "rag_gpu_memory_total_bytes"}
# Series labelled by a reason, which exist once something was rejected (rate limit, full queue).
NOT_CAUSED_HERE = {"rag_gateway_rejected_total"}


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


def test_prometheus_evaluates_every_dashboard_query(stack: Stack, prometheus: Prometheus) -> None:
    drive_traffic(stack)
    load_embedding(stack, clients=2, seconds=3)
    # Where the models run decides which panels can have data: GPU series exist only on a GPU.
    devices = {s["metric"]["device"] for s in eventually(prometheus.url, "rag_model_info")}
    on_gpu = any(d.startswith("cuda") for d in devices)
    empty = []
    for expr in dashboard_queries():
        result = query(prometheus.url, expr.replace("$__rate_interval", "1m"))  # asserts Prometheus accepted it
        if not result:
            empty.append(expr)
    gpu_panels = [e for e in dashboard_queries() if set(re.findall(r"\brag_[a-z0-9_]+", e)) <= GPU_ONLY]
    assert gpu_panels
    # Labelled series that appear with their first event, which this run does not cause.
    not_caused = [e for e in dashboard_queries() if set(re.findall(r"\brag_[a-z0-9_]+", e)) <= NOT_CAUSED_HERE]
    # Server errors are not caused here either: the panel of 5xx answers has data exactly when some service
    # answered one (a request racing a model still loading at start, say).
    errors = [e for e in dashboard_queries() if 'status=~"5.."' in e]
    assert errors
    if not query(prometheus.url, 'rag_http_requests_total{status=~"5.."}'):
        not_caused += errors
    expected_empty = [e for e in dashboard_queries() if e in not_caused or (e in gpu_panels and not on_gpu)]
    assert empty == expected_empty
