"""One test per scheduling, GPU-sharing and autoscaling rule of the design, on the rendered overlays.

Each test is named after its rule and runs on the overlays where the rule
applies: the GPU overlays (gpu-cluster, time-slicing, mig, spot) carry the
production sizes; cpu-only shrinks requests and drops the GPUs (its own test).
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy import capacity
from deploy.manifests import all_containers, node_selector_terms_match
from services.embedding.config import Settings as EmbeddingSettings
from services.retriever.config import Settings as RetrieverSettings
from tests.fixtures import k8s_manifests as k8s
from tests.fixtures.k8s_manifests import gpu_resources, label_selector_matches, pod_template, quantity, resources

GPU = pytest.mark.parametrize("overlay", k8s.GPU_OVERLAYS)
ALL = pytest.mark.parametrize("overlay", k8s.OVERLAYS)
GPU_TAINT_KEY = "nvidia.com/gpu"
README = k8s.K8S / "README.md"


def labels_of(render, kind: str, name: str) -> dict[str, str]:
    return pod_template(render.get(kind, name))["metadata"]["labels"]


def cpu_mem(container) -> tuple[float, float, float, float]:
    requests, limits = resources(container, "requests"), resources(container, "limits")
    return requests["cpu"], limits["cpu"], requests["memory"], limits["memory"]


def tolerates_gpu_taint(pod_spec) -> bool:
    return any(
        t.get("key") == GPU_TAINT_KEY and t.get("operator") == "Exists" and t.get("effect") == "NoSchedule"
        for t in pod_spec.get("tolerations", [])
    )


def on_cpu_nodes(pod_spec) -> bool:
    """No GPU toleration, no GPU resource, and required node affinity away from GPU pools."""
    terms = (
        pod_spec.get("affinity", {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", {})
        .get("nodeSelectorTerms", [])
    )
    away_from_gpus = bool(terms) and all(
        {"key": "accelerator", "operator": "DoesNotExist"} in term.get("matchExpressions", []) for term in terms
    )
    no_gpu = not any(gpu_resources(c) for c in k8s.all_containers(pod_spec))
    return away_from_gpus and no_gpu and not tolerates_gpu_taint(pod_spec)


def pods_metric(hpa, name: str):
    found = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods" and m["pods"]["metric"]["name"] == name]
    assert len(found) == 1, f"HPA {hpa['metadata']['name']} has no Pods metric {name}"
    return found[0]["pods"]["target"]


def cpu_utilization(hpa) -> int | None:
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Resource" and metric["resource"]["name"] == "cpu":
            target = metric["resource"]["target"]
            assert target["type"] == "Utilization"
            return int(target["averageUtilization"])
    return None


def priority_of(render, pod_spec) -> int:
    return int(render.get("PriorityClass", pod_spec["priorityClassName"])["value"])


def capacity_plan(render) -> list[dict]:
    return yaml.safe_load(render.get("ConfigMap", "gpu-capacity-plan")["data"]["node-pools.yaml"])["nodePools"]


# --- the services ------------------------------------------------------------------------------


@GPU
def test_gateway_cpu_half_to_two_512mi_to_2gi_cpu_nodes_spread_over_every_zone_hpa_2_20_cpu70_or_500rps(
    renders, overlay
):
    render = renders[overlay]
    pod = render.pod_spec("Deployment", "gateway")
    assert cpu_mem(k8s.container_named(pod, "gateway")) == (0.5, 2, 512 * 2**20, 2 * 2**30)
    assert on_cpu_nodes(pod)
    zone = [c for c in pod["topologySpreadConstraints"] if c["topologyKey"] == "topology.kubernetes.io/zone"]
    assert len(zone) == 1
    assert zone[0]["maxSkew"] == 1 and zone[0]["whenUnsatisfiable"] == "DoNotSchedule"
    assert label_selector_matches(zone[0]["labelSelector"], labels_of(render, "Deployment", "gateway"))
    hpa = render.hpa_for("Deployment", "gateway")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 20)
    assert cpu_utilization(hpa) == 70
    target = pods_metric(hpa, "rag_http_requests_per_second")
    assert target["type"] == "AverageValue" and quantity(target["averageValue"]) == 500


@GPU
def test_embedding_cpu_2_to_4_or_one_gpu_on_the_embedding_pool_only_hpa_2_10_on_in_flight_and_batch_wait_or_cpu70(
    renders, overlay
):
    render = renders[overlay]
    gpu_pod = render.pod_spec("Deployment", "embedding-gpu")
    container = k8s.container_named(gpu_pod, "embedding")
    assert k8s.ragpod_repository(container["image"]) == "ragpod/embedding" and container["image"].endswith("-gpu")
    units = gpu_resources(container)
    assert len(units) == 1 and list(units.values()) == [1]
    (unit,) = units
    assert resources(container, "requests")[unit] == resources(container, "limits")[unit]
    assert cpu_mem(container)[:2] == (2, 4)
    assert tolerates_gpu_taint(gpu_pod)
    # A GPU pod never serves from the CPU unseen; threads fit its CPU limit.
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RAG_EMBEDDING_DEVICE"] == "cuda"
    assert int(env["OMP_NUM_THREADS"]) == int(cpu_mem(container)[1])
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    # Required, not preferred: the pods never take a node of the LLM's pool (nor make the
    # Cluster Autoscaler add one for them). The MIG overlay's embedding pool is the A100s cut
    # into slices, which only it asks for.
    assert "requiredDuringSchedulingIgnoredDuringExecution" in gpu_pod["affinity"]["nodeAffinity"]
    pools = capacity.read_pools(render.objects)
    llm_pod = render.get("Deployment", "llm")["spec"]["template"]
    admitted = [pool for pool in pools if capacity.admits(pool, {"spec": gpu_pod})]
    assert admitted and all(unit in pool.offers for pool in admitted)
    for pool in admitted:
        assert not capacity.admits(pool, llm_pod) or unit != "nvidia.com/gpu", f"{pool.name} is the LLM's pool"
    hpa = render.hpa_for("Deployment", "embedding-gpu")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    # What the service measures itself holds on whole GPUs, time-slices and MIG alike;
    # NVML utilisation is absent on MIG and the whole card's under time-slicing.
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert names == {"rag_embedding_requests_in_flight", "rag_embedding_batch_wait_p95_seconds"}
    in_flight = pods_metric(hpa, "rag_embedding_requests_in_flight")
    assert in_flight["type"] == "AverageValue" and quantity(in_flight["averageValue"]) > 0
    wait = pods_metric(hpa, "rag_embedding_batch_wait_p95_seconds")
    config = render.get("ConfigMap", "embedding-config")["data"]
    max_wait = float(
        config.get("RAG_EMBEDDING_MAX_WAIT_MS", EmbeddingSettings.model_fields["embedding_max_wait_ms"].default)
    )
    # Above the batch window: waiting beyond it means queueing behind the model.
    assert wait["type"] == "AverageValue" and quantity(wait["averageValue"]) > max_wait / 1000
    assert cpu_utilization(hpa) == 70

    # The CPU fallback: CPU 2-4 on CPU nodes, so embedding goes on when every GPU is taken.
    cpu_pod = render.pod_spec("Deployment", "embedding")
    container = k8s.container_named(cpu_pod, "embedding")
    assert not container["image"].endswith("-gpu")
    assert cpu_mem(container)[:2] == (2, 4)
    assert on_cpu_nodes(cpu_pod)
    assert cpu_utilization(render.hpa_for("Deployment", "embedding")) == 70


@ALL
def test_embedding_gpu_and_cpu_pods_have_their_own_services_and_the_retriever_spills_from_one_to_the_other(
    renders, overlay
):
    render = renders[overlay]
    services = {
        s["metadata"]["name"]
        for s in render.all("Service")
        if s["spec"]["selector"].get("app.kubernetes.io/name") == "embedding"
    }
    retriever = render.get("ConfigMap", "retriever-config")["data"]

    def selects(service: str, deployment: str) -> bool:
        selector = {"matchLabels": render.get("Service", service)["spec"]["selector"]}
        return label_selector_matches(selector, labels_of(render, "Deployment", deployment))

    def service_of(url: str) -> str:
        host, _, port = url.removeprefix("http://").partition(":")
        assert port == "8001", url
        return host

    if overlay == "cpu-only":
        assert set(services) == {"embedding"} and selects("embedding", "embedding")
        assert service_of(retriever["RAG_EMBEDDING_URL"]) == "embedding"
        assert retriever.get("RAG_EMBEDDING_CPU_URL", "") == ""
        return
    # No Service selects both kinds of pod: the CPU pods would take an equal share of every request.
    assert set(services) == {"embedding", "embedding-gpu"}
    assert selects("embedding-gpu", "embedding-gpu") and not selects("embedding-gpu", "embedding")
    assert selects("embedding", "embedding") and not selects("embedding", "embedding-gpu")
    assert service_of(retriever["RAG_EMBEDDING_URL"]) == "embedding-gpu"
    assert service_of(retriever["RAG_EMBEDDING_CPU_URL"]) == "embedding"
    # The retriever reads both settings.
    known = k8s.settings_env_names(RetrieverSettings)
    assert {"RAG_EMBEDDING_URL", "RAG_EMBEDDING_CPU_URL"} <= set(known)


@GPU
def test_qdrant_statefulset_cpu_4_8_memory_64gi_high_memory_nodes_one_per_node_volumes_manual_replicas(
    renders, overlay
):
    render = renders[overlay]
    qdrant = render.get("StatefulSet", "qdrant")
    pod = qdrant["spec"]["template"]["spec"]
    # Memory requested as limited (the seed's 64Gi ceiling): a peer above its request is evicted first.
    assert cpu_mem(k8s.container_named(pod, "qdrant")) == (4, 8, 64 * 2**30, 64 * 2**30)
    assert pod["nodeSelector"] == {"node.ragpod.io/pool": "highmem"}
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(
        term["topologyKey"] == "kubernetes.io/hostname"
        and label_selector_matches(term["labelSelector"], labels_of(render, "StatefulSet", "qdrant"))
        for term in anti
    )
    claims = [t["metadata"]["name"] for t in qdrant["spec"]["volumeClaimTemplates"]]
    mounts = {m["name"]: m["mountPath"] for m in k8s.container_named(pod, "qdrant")["volumeMounts"]}
    assert mounts[claims[0]] == "/qdrant/storage"
    assert qdrant["spec"]["replicas"] >= 2
    scaled = [h["spec"]["scaleTargetRef"]["name"] for h in render.all("HorizontalPodAutoscaler")]
    scaled += [s["spec"]["scaleTargetRef"]["name"] for s in render.all("ScaledObject")]
    assert "qdrant" not in scaled


@GPU
def test_retriever_cpu_1_2_memory_2_4gi_near_qdrant_never_beside_llm_hpa_2_10_on_its_own_cpu(renders, overlay):
    render = renders[overlay]
    pod = render.pod_spec("Deployment", "retriever")
    assert cpu_mem(k8s.container_named(pod, "retriever")) == (1, 2, 2 * 2**30, 4 * 2**30)
    assert on_cpu_nodes(pod)
    qdrant = labels_of(render, "StatefulSet", "qdrant")
    near = pod["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert any(
        t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        and label_selector_matches(t["podAffinityTerm"]["labelSelector"], qdrant)
        for t in near
    )
    llm = labels_of(render, "Deployment", "llm")
    apart = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(
        t["topologyKey"] == "kubernetes.io/hostname" and label_selector_matches(t["labelSelector"], llm) for t in apart
    )
    assert not label_selector_matches(apart[0]["labelSelector"], labels_of(render, "Deployment", "retriever"))
    hpa = render.hpa_for("Deployment", "retriever")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    # What the retriever owns: its CPU. Its latency and its requests in flight include the embedding call
    # and Qdrant's search: on those, a slow dependency would add retrievers and load on that dependency.
    assert hpa["spec"]["metrics"] == [
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}
    ]


@GPU
def test_llm_worker_beside_vllm_owning_the_gpu_a100_nodes_requests_4_16gi_limits_8_32gi_zone_spread_top_priority(
    renders, overlay
):
    render = renders[overlay]
    pod = render.pod_spec("Deployment", "llm")
    config = render.get("ConfigMap", "llm-config")["data"]
    worker = k8s.container_named(pod, "worker")
    server = k8s.container_named(pod, "model-server")
    # vLLM is a native sidecar: started, and past its startupProbe, before the worker; stopped after it.
    assert [c["name"] for c in pod["containers"]] == ["worker"]
    assert [c["name"] for c in pod["initContainers"]][-1] == "model-server"
    assert server["restartPolicy"] == "Always"
    assert server["startupProbe"]["httpGet"]["path"] == "/health"
    assert "lifecycle" not in server  # no preStop sleep: the kubelet stops a sidecar after the worker has left
    assert k8s.ragpod_repository(worker["image"]) == "ragpod/llm"
    image, _, tag = server["image"].partition(":")
    assert image == "vllm/vllm-openai" and tag.startswith("v") and tag != "latest"
    # The GPU belongs to the model server; the worker has none.
    assert gpu_resources(worker) == {}
    requests = {k: v for k, v in resources(server, "requests").items() if k != "ephemeral-storage"}
    assert requests == {"cpu": 4, "memory": 16 * 2**30, "nvidia.com/gpu": 1}
    assert resources(server, "limits") == {"cpu": 8, "memory": 32 * 2**30, "nvidia.com/gpu": 1}
    # vLLM serves the configured model on 8004, where the worker looks for it.
    env = {e["name"]: e for e in server["env"]}
    assert env["RAG_LLM_MODEL_NAME"]["valueFrom"]["configMapKeyRef"] == {
        "name": "llm-config",
        "key": "RAG_LLM_MODEL_NAME",
    }
    args = [a.replace("$(RAG_LLM_MODEL_NAME)", config["RAG_LLM_MODEL_NAME"]) for a in server["args"]]
    assert "--port=8004" in args
    # Closed by default: vLLM takes the key from a Secret it cannot start without; the worker sends it.
    assert "--api-key=$(VLLM_API_KEY)" in server["args"]
    vllm_key = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert not vllm_key.get("optional")
    sent = {e["name"]: e for e in worker["env"]}["RAG_LLM_OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert (sent["name"], sent["key"]) == (vllm_key["name"], vllm_key["key"])
    assert f"--served-model-name={config['RAG_LLM_MODEL_NAME']}" in args
    assert config["RAG_LLM_OPENAI_URL"] == "http://127.0.0.1:8004/v1"
    assert "/" in config["RAG_LLM_MODEL_NAME"] and "smollm" not in config["RAG_LLM_MODEL_NAME"]
    # The weights come from a read-only volume, not a download.
    # `vllm serve MODEL` (the image's entry point): the model is positional, --model is deprecated.
    model_arg = args[0]
    assert not any(a == "--model" or a.startswith("--model=") for a in args)
    models = {m["name"]: m for m in server["volumeMounts"]}["models"]
    assert model_arg.startswith(models["mountPath"] + "/") and models["readOnly"]
    volume = {v["name"]: v for v in pod["volumes"]}["models"]
    claim = render.get("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert env["HF_HUB_OFFLINE"]["value"] == "1" and claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert {server["livenessProbe"]["httpGet"]["path"], server["readinessProbe"]["httpGet"]["path"]} == {"/health"}
    # Scheduling.
    assert pod["nodeSelector"] == {"accelerator": "nvidia-a100"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (spread,) = pod["topologySpreadConstraints"]
    assert (spread["maxSkew"], spread["topologyKey"], spread["whenUnsatisfiable"]) == (
        1,
        "topology.kubernetes.io/zone",
        "ScheduleAnyway",
    )
    assert label_selector_matches(spread["labelSelector"], labels_of(render, "Deployment", "llm"))
    values = [int(p["value"]) for p in render.all("PriorityClass")]
    assert priority_of(render, pod) == max(values) and values.count(max(values)) == 1
    # The worker drains in flight jobs before the pod is killed, with its model server still up.
    drain = float(config["RAG_LLM_DRAIN_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > drain


@GPU
def test_a_zone_outage_does_not_block_scaling(renders, overlay):
    """Zone spreads count only nodes a pod could use, and only the pods of its own revision."""
    render = renders[overlay]

    def zone_spread(name: str) -> dict:
        spreads = render.pod_spec("Deployment", name).get("topologySpreadConstraints", [])
        (spread,) = [c for c in spreads if c["topologyKey"] == "topology.kubernetes.io/zone"]
        assert label_selector_matches(spread["labelSelector"], labels_of(render, "Deployment", name)), name
        return spread

    gateway = zone_spread("gateway")
    # DoNotSchedule with tainted (unreachable) nodes counted would keep the skew from ever being met.
    assert gateway["whenUnsatisfiable"] == "DoNotSchedule" and gateway["nodeTaintsPolicy"] == "Honor"
    for name in ("gateway", "llm", "embedding-gpu"):
        assert zone_spread(name)["matchLabelKeys"] == ["pod-template-hash"], name
    # Qdrant's peers hold two copies of each shard: strictly one zone apart, an outage's tainted nodes aside.
    (qdrant,) = render.pod_spec("StatefulSet", "qdrant")["topologySpreadConstraints"]
    assert qdrant["topologyKey"] == "topology.kubernetes.io/zone"
    assert (qdrant["whenUnsatisfiable"], qdrant["nodeTaintsPolicy"]) == ("DoNotSchedule", "Honor")
    assert zone_spread("embedding-gpu")["whenUnsatisfiable"] == "ScheduleAnyway"


@ALL
def test_llm_keda_scaledobject_1_8_on_the_exported_queue_depth_over_5_per_replica_and_jobs_in_flight(renders, overlay):
    """KEDA reads rag_llm_queue_depth (admitted, not yet started) through its Prometheus trigger.

    The Redis Streams trigger's lag leaves out jobs claimed but not started
    (tests/deploy/test_keda_queue_signal.py shows it on a real redis-server).
    """
    render = renders[overlay]
    scaled = render.get("ScaledObject", "llm")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "llm" and spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 8)
    # A rollout replaces pods one at a time (no surge pod: none would fit the pool at full scale); with
    # two pods at least, one serves while the other is replaced.
    rollout = render.get("Deployment", "llm")["spec"]["strategy"]["rollingUpdate"]
    assert spec["minReplicaCount"] - int(rollout["maxUnavailable"]) + int(rollout["maxSurge"]) >= 1
    assert int(rollout["maxUnavailable"]) < spec["minReplicaCount"]
    # Prometheus down: keep what runs, never fewer (KEDA >= 2.17).
    assert spec["fallback"]["behavior"] == "currentReplicasIfHigher"
    assert [h for h in render.all("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == "llm"] == []
    assert spec["fallback"]["replicas"] >= spec["minReplicaCount"]
    config = render.get("ConfigMap", "llm-config")["data"]
    # Besides these two, only the cron trigger of the peak hours (test_k8s_operations.py).
    triggers = {t["name"]: t for t in spec["triggers"] if t["type"] != "cron"}
    assert set(triggers) == {"queue-depth", "in-flight"}
    for trigger in triggers.values():
        assert trigger["type"] == "prometheus"
        # Per replica: KEDA divides the value by the replicas.
        assert trigger.get("metricType", "AverageValue") == "AverageValue"
        meta = trigger["metadata"]
        assert meta["serverAddress"].startswith("http://") and ".monitoring.svc:" in meta["serverAddress"]
        assert f'namespace="{k8s.NAMESPACE}"' in meta["query"]
        # No value (Prometheus away, no worker exporting) is an error, so the fallback holds.
        assert meta["ignoreNullValues"] == "false"
    depth = triggers["queue-depth"]["metadata"]
    assert depth["query"] == f'max(rag_llm_queue_depth{{namespace="{k8s.NAMESPACE}"}})'
    assert depth["threshold"] == "5" and depth["activationThreshold"] == "0"
    in_flight = triggers["in-flight"]["metadata"]
    assert in_flight["query"] == f'sum(rag_llm_jobs_in_flight{{namespace="{k8s.NAMESPACE}"}})'
    assert in_flight["threshold"] == config["RAG_LLM_CONCURRENCY"]
    # The series are scraped where the workers serve them.
    monitor = render.get("PodMonitor", "llm")
    assert label_selector_matches(monitor["spec"]["selector"], labels_of(render, "Deployment", "llm"))
    # Nothing reads Redis from KEDA's namespace any more.
    assert render.all("TriggerAuthentication") == []


@GPU
def test_redis_fixed_ha_primary_replicas_sentinel_cpu1_memory_2_4gi_persistent_append_only(renders, overlay):
    render = renders[overlay]
    redis = render.get("StatefulSet", "redis")
    pod = redis["spec"]["template"]["spec"]
    assert redis["spec"]["replicas"] == 3
    targets = [h["spec"]["scaleTargetRef"]["name"] for h in render.all("HorizontalPodAutoscaler")]
    assert "redis" not in targets + [s["spec"]["scaleTargetRef"]["name"] for s in render.all("ScaledObject")]
    assert cpu_mem(k8s.container_named(pod, "redis")) == (1, 1, 2 * 2**30, 4 * 2**30)
    assert on_cpu_nodes(pod)
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert label_selector_matches(anti[0]["labelSelector"], labels_of(render, "StatefulSet", "redis"))
    sentinel = k8s.container_named(pod, "sentinel")
    assert sentinel["ports"][0]["containerPort"] == 26379 and "--sentinel" in sentinel["command"]
    claim = redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert {"name": claim, "mountPath": "/data"} in k8s.container_named(pod, "redis")["volumeMounts"]
    pdb = render.get("PodDisruptionBudget", "redis")
    assert pdb["spec"]["minAvailable"] == 2
    # The services find the primary through these Sentinels.
    sentinels = [f"redis-{i}.{redis['spec']['serviceName']}:26379" for i in range(3)]
    for name in ("gateway-config", "llm-config"):
        assert render.get("ConfigMap", name)["data"]["RAG_REDIS_SENTINELS"].split(",") == sentinels
    readme = README.read_text()
    assert "Sentinel" in readme and "appendfsync everysec" in readme


@pytest.mark.parametrize("pod_name", ["redis-0", "redis-1"])
def test_redis_configure_script_writes_a_durable_config_and_follows_the_primary(renders, tmp_path, pod_name):
    """Runs the init script as the pod would, with no Sentinel answering (a new cluster)."""
    script = renders["gpu-cluster"].get("ConfigMap", "redis-scripts")["data"]["configure.sh"]
    conf = tmp_path / "conf"
    conf.mkdir()
    local = tmp_path / "configure.sh"
    local.write_text(script.replace("/conf/", f"{conf}/"))
    env = {
        "PATH": "/usr/bin:/bin",
        "POD_NAME": pod_name,
        "POD_NAMESPACE": k8s.NAMESPACE,
        "SENTINEL_MASTER": "ragpod",
        "REDIS_MAXMEMORY": "2gb",
        "REDIS_PASSWORD": "s3cret",
    }
    done = subprocess.run(["/bin/sh", str(local)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    server = (conf / "redis.conf").read_text().splitlines()
    sentinel = (conf / "sentinel.conf").read_text().splitlines()
    primary = f"redis-0.redis-headless.{k8s.NAMESPACE}.svc"
    for line in ("appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction", "requirepass s3cret"):
        assert line in server
    assert ("replicaof " + primary + " 6379" in server) is (pod_name != "redis-0")
    assert f"sentinel monitor ragpod {primary} 6379 2" in sentinel
    assert f"sentinel announce-ip {pod_name}.redis-headless.{k8s.NAMESPACE}.svc" in sentinel


# --- GPU sharing -------------------------------------------------------------------------------


def device_plugin_config(render, key: str) -> dict:
    cm = render.get("ConfigMap", "ragpod-device-plugin-config", "gpu-operator")
    return yaml.safe_load(cm["data"][key])


def test_gpu_sharing_time_slicing_four_replicas_for_the_embedding_pool(renders):
    render = renders["time-slicing"]
    (shared_pool,) = [p for p in capacity_plan(render) if p.get("devicePluginConfig") == "embedding-shared"]
    config = device_plugin_config(render, shared_pool["devicePluginConfig"])
    slicing = config["sharing"]["timeSlicing"]
    assert slicing["renameByDefault"] is True
    assert slicing["resources"] == [{"name": "nvidia.com/gpu", "replicas": 4}]
    # Nodes of that pool pick the configuration by label.
    assert shared_pool["labels"]["nvidia.com/device-plugin.config"] == "embedding-shared"
    # The embedding pods ask for one slice, the LLM pods keep whole GPUs.
    embedding = render.container("Deployment", "embedding-gpu", "embedding")
    assert gpu_resources(embedding) == {"nvidia.com/gpu.shared": 1}
    assert gpu_resources(render.container("Deployment", "llm", "model-server")) == {"nvidia.com/gpu": 1}
    assert "sharing" not in device_plugin_config(render, "default")
    assert renders["gpu-cluster"].find("ConfigMap", "ragpod-device-plugin-config", "gpu-operator") is None


def test_gpu_sharing_mig_mixed_strategy_embedding_on_a_small_slice_llm_on_a_full_gpu(renders):
    render = renders["mig"]
    (pool,) = [p for p in capacity_plan(render) if p.get("migConfig")]
    assert device_plugin_config(render, pool["devicePluginConfig"])["flags"]["migStrategy"] == "mixed"
    layouts = yaml.safe_load(render.get("ConfigMap", "ragpod-mig-parted-config", "gpu-operator")["data"]["config.yaml"])
    layout = layouts["mig-configs"][pool["migConfig"]]
    sliced = [g for g in layout if g["mig-enabled"]]
    whole = [g for g in layout if not g["mig-enabled"]]
    assert sliced and whole
    assert all(set(g["mig-devices"]) == {"1g.10gb"} for g in sliced)
    assert pool["labels"]["nvidia.com/mig.config"] == pool["migConfig"]
    embedding = render.container("Deployment", "embedding-gpu", "embedding")
    assert gpu_resources(embedding) == {"nvidia.com/mig-1g.10gb": 1}
    assert gpu_resources(render.container("Deployment", "llm", "model-server")) == {"nvidia.com/gpu": 1}
    # Only on nodes where 1g.10gb is a valid profile and applied: the pool label (seen by the Cluster
    # Autoscaler), GPU feature discovery's memory (80 GB cards) and the MIG manager's state.
    affinity = render.pod_spec("Deployment", "embedding-gpu")["affinity"]["nodeAffinity"]
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    wanted = {e["key"]: e for e in term["matchExpressions"]}
    assert wanted["nvidia.com/mig.config"]["values"] == [pool["migConfig"]]
    assert wanted["nvidia.com/mig.config.state"] == {
        "key": "nvidia.com/mig.config.state",
        "operator": "In",
        "values": ["success"],
    }
    memory = wanted["nvidia.com/gpu.memory"]
    assert memory["operator"] == "Gt" and 40960 <= int(memory["values"][0]) < 81559  # 40 GB out, 80 GB in
    assert node_selector_terms_match([term], pool["labels"])  # the planned pool takes them
    forty = {**pool["labels"], "nvidia.com/gpu.memory": "40960"}
    pending = {**pool["labels"], "nvidia.com/mig.config.state": "pending"}
    assert not node_selector_terms_match([term], forty) and not node_selector_terms_match([term], pending)


def test_gpu_sharing_spot_pool_runs_reindexing_with_spot_toleration_and_the_lowest_priority(renders):
    render = renders["spot"]
    (spot,) = [p for p in capacity_plan(render) if p["labels"].get("node.ragpod.io/lifecycle") == "spot"]
    assert spot["minNodes"] == 0
    cron = render.get("CronJob", "reindex")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = pod_template(cron)["spec"]
    for taint in spot["taints"]:
        spec, _, effect = taint.rpartition(":")
        key, _, value = spec.partition("=")
        assert any(
            t["key"] == key and t["effect"] == effect and (t["operator"] == "Exists" or t.get("value") == value)
            for t in pod["tolerations"]
        ), taint
    assert all(spot["labels"].get(k) == v for k, v in pod["nodeSelector"].items())
    assert any(gpu_resources(c) for c in k8s.all_containers(pod))
    # Lowest of all classes, never preempts, still above the autoscaler's expendable cutoff.
    batch = render.get("PriorityClass", pod["priorityClassName"])
    assert int(batch["value"]) == min(int(p["value"]) for p in render.all("PriorityClass"))
    assert batch["preemptionPolicy"] == "Never" and int(batch["value"]) >= -10
    # No online pod tolerates the spot taint.
    for workload in render.workloads():
        if workload["metadata"]["name"] == "reindex":
            continue
        tolerations = pod_template(workload)["spec"].get("tolerations", [])
        assert not any(t.get("key") == "node.ragpod.io/lifecycle" for t in tolerations)
    retry = cron["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert {"type": "DisruptionTarget", "status": "True"} in retry[0]["onPodConditions"]


@ALL
def test_gpu_sharing_resource_quota_on_gpus_in_rag_production(renders, overlay):
    render = renders[overlay]
    quota = render.get("ResourceQuota", "gpu-quota", k8s.NAMESPACE)["spec"]["hard"]
    assert "requests.nvidia.com/gpu" in quota
    requested = set()
    for workload in render.workloads():
        if workload["metadata"]["namespace"] == k8s.NAMESPACE:
            for container in k8s.all_containers(pod_template(workload)["spec"]):
                requested |= set(gpu_resources(container))
    assert {f"requests.{name}" for name in requested} <= set(quota)
    if overlay == "cpu-only":
        assert quota == {"requests.nvidia.com/gpu": "0"}


@GPU
def test_cluster_autoscaler_gpu_group_1_to_4_and_preemptible_placeholder_pods_keep_headroom(renders, overlay):
    render = renders[overlay]
    (group,) = [p for p in capacity_plan(render) if p["labels"].get("accelerator") == "nvidia-a100"]
    assert (group["minNodes"], group["maxNodes"]) == (1, 4)
    readme = README.read_text()
    assert "--nodes=1:4:" in readme and "--expendable-pods-priority-cutoff=-10" in readme
    headroom = render.get("Deployment", "gpu-headroom")
    pod = headroom["spec"]["template"]["spec"]
    llm = render.pod_spec("Deployment", "llm")
    # Where an LLM pod goes, holding what its GPU container holds.
    assert pod["nodeSelector"] == llm["nodeSelector"] and pod["tolerations"] == llm["tolerations"]
    (pause,) = pod["containers"]
    assert gpu_resources(pause) == gpu_resources(k8s.container_named(llm, "model-server"))
    # Below every GPU workload, not expendable for the autoscaler, never preempting.
    placeholder = render.get("PriorityClass", pod["priorityClassName"])
    assert placeholder["preemptionPolicy"] == "Never"
    assert -10 <= int(placeholder["value"]) < 0
    for name in ("llm", "embedding-gpu"):
        assert int(placeholder["value"]) < priority_of(render, render.pod_spec("Deployment", name))
    # Its own namespace and quota: it never holds rag-production's GPU quota.
    namespace = headroom["metadata"]["namespace"]
    assert namespace != k8s.NAMESPACE
    assert render.get("ResourceQuota", "gpu-quota", namespace)["spec"]["hard"]["requests.nvidia.com/gpu"] == str(
        headroom["spec"]["replicas"]
    )


def test_cpu_only_overlay_has_no_gpu_the_cpu_model_server_and_the_cpu_embedding(renders):
    render = renders["cpu-only"]
    for workload in render.workloads():
        pod = pod_template(workload)["spec"]
        assert not tolerates_gpu_taint(pod)
        assert "accelerator" not in pod.get("nodeSelector", {})
        for container in k8s.all_containers(pod):
            assert gpu_resources(container) == {}
            assert not container["image"].startswith("vllm/") and not container["image"].endswith("-gpu")
    assert render.find("Deployment", "embedding-gpu") is None
    server = render.container("Deployment", "llm", "model-server")
    assert server["image"].startswith("ragpod/llm:")
    assert server["command"] == ["python", "-m", "services.llm.server"]
    assert server["ports"] == [{"name": "model", "containerPort": 8004}]
    assert {"name": "model-cache", "mountPath": "/app/data/models"} in server["volumeMounts"]
    hpa = render.hpa_for("Deployment", "embedding")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"], cpu_utilization(hpa)) == (2, 10, 70)
    # Everything fits a one-node kind cluster: no hard spreading, no hard separation.
    for workload in render.workloads():
        pod = pod_template(workload)["spec"]
        assert all(c["whenUnsatisfiable"] == "ScheduleAnyway" for c in pod.get("topologySpreadConstraints", []))
        hard = pod.get("affinity", {}).get("podAntiAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
        assert not hard or workload["spec"].get("replicas") == 1, workload["metadata"]["name"]
        assert "nodeSelector" not in pod, workload["metadata"]["name"]


# --- every workload ----------------------------------------------------------------------------


@ALL
def test_every_workload_container_has_requests_and_limits(renders, overlay):
    missing = []
    for workload in renders[overlay].workloads():
        for container in k8s.all_containers(pod_template(workload)["spec"]):
            requests, limits = resources(container, "requests"), resources(container, "limits")
            for name in ("cpu", "memory"):
                if name not in requests or name not in limits or requests[name] > limits[name]:
                    missing.append(f"{workload['metadata']['name']}/{container['name']} {name}")
    assert missing == []


@ALL
def test_every_service_has_liveness_healthz_and_readiness_readyz_probes(renders, overlay):
    render = renders[overlay]
    checked = 0
    for kind, name in k8s.SERVICE_WORKLOADS:
        workload = render.find(kind, name)
        if workload is None:
            continue
        pod = workload["spec"]["template"]["spec"]
        sidecars = [c for c in pod.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
        for container in pod["containers"] + sidecars:
            assert "livenessProbe" in container and "readinessProbe" in container, f"{name}/{container['name']}"
            live = container["livenessProbe"].get("httpGet", {}).get("path")
            ready = container["readinessProbe"].get("httpGet", {}).get("path")
            if k8s.ragpod_repository(container["image"]) or container["image"].startswith("qdrant/"):
                assert (live, ready) == ("/healthz", "/readyz"), f"{name}/{container['name']}"
                checked += 1
            elif container["image"].startswith("vllm/"):
                assert (live, ready) == ("/health", "/health")
    assert checked >= 6


@ALL
def test_every_service_has_a_pod_disruption_budget(renders, overlay):
    render = renders[overlay]
    for kind, name in k8s.SERVICE_WORKLOADS:
        if render.find(kind, name) is None:
            continue
        labels = labels_of(render, kind, name)
        budgets = [
            p for p in render.all("PodDisruptionBudget") if label_selector_matches(p["spec"]["selector"], labels)
        ]
        assert len(budgets) == 1, f"{kind}/{name}: {len(budgets)} budgets"
        spec = budgets[0]["spec"]
        assert spec.get("maxUnavailable", 0) == 1 or spec.get("minAvailable", 0) >= 1


@ALL
def test_every_workload_has_its_own_service_account_without_a_token(renders, overlay):
    render = renders[overlay]
    for workload in render.workloads():
        pod = pod_template(workload)["spec"]
        account = render.get("ServiceAccount", pod["serviceAccountName"], workload["metadata"]["namespace"])
        assert pod["serviceAccountName"] != "default"
        assert account["automountServiceAccountToken"] is False
        assert pod["automountServiceAccountToken"] is False


@ALL
def test_every_workload_runs_under_a_restricted_security_context(renders, overlay):
    render = renders[overlay]
    for namespace in {w["metadata"]["namespace"] for w in render.workloads()}:
        labels = render.get("Namespace", namespace)["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in render.workloads():
        pod = pod_template(workload)["spec"]
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert not any("hostPath" in v for v in pod.get("volumes", []))
        for container in k8s.all_containers(pod):
            own = container["securityContext"]
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert own["allowPrivilegeEscalation"] is False, where
            assert own["readOnlyRootFilesystem"] is True, where
            assert own["capabilities"] == {"drop": ["ALL"]}, where
            assert not own.get("privileged", False) and own.get("runAsUser", 1) != 0, where
            # A read-only root: every process that may write gets an emptyDir at /tmp.
            if container["name"] != "pause":
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                volume = {v["name"]: v for v in pod["volumes"]}[mounts["/tmp"]]
                assert "emptyDir" in volume, where


# --- network policies --------------------------------------------------------------------------


def _peer_matches(peer, source_labels, source_namespace, policy_namespace) -> bool:
    if "ipBlock" in peer:
        return source_namespace is None
    namespace_selector = peer.get("namespaceSelector")
    if namespace_selector is None:
        if source_namespace != policy_namespace:
            return False
    elif not label_selector_matches(namespace_selector, {"kubernetes.io/metadata.name": source_namespace or ""}):
        return False
    return label_selector_matches(peer.get("podSelector", {}), source_labels)


def _rule_allows(rule, port, peer_labels, peer_namespace, policy_namespace, direction) -> bool:
    ports = rule.get("ports")
    if ports and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
        return False
    peers = rule.get("from" if direction == "ingress" else "to")
    if not peers:
        return True
    return any(_peer_matches(p, peer_labels, peer_namespace, policy_namespace) for p in peers)


def _allowed(policies, direction, pod_labels, pod_namespace, port, peer_labels, peer_namespace) -> bool:
    kind = "Ingress" if direction == "ingress" else "Egress"
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == pod_namespace
        and kind in p["spec"].get("policyTypes", ["Ingress"])
        and label_selector_matches(p["spec"]["podSelector"], pod_labels)
    ]
    if not selecting:
        return True
    return any(
        _rule_allows(rule, port, peer_labels, peer_namespace, pod_namespace, direction)
        for p in selecting
        for rule in p["spec"].get(direction, [])
    )


def _pods(render):
    """app name -> (labels, namespace, TCP ports) of the workloads' pod templates."""
    pods = {}
    for workload in render.workloads():
        template = pod_template(workload)
        labels = template["metadata"]["labels"]
        ports = {p["containerPort"] for c in k8s.all_containers(template["spec"]) for p in c.get("ports", [])}
        name = labels["app.kubernetes.io/name"]
        known = pods.get(name, (labels, workload["metadata"]["namespace"], set()))
        pods[name] = (labels, workload["metadata"]["namespace"], known[2] | ports)
    return pods


# The flows of the design, and nothing else between the pods.
DESIGN_FLOWS = {
    ("gateway", "retriever", 8002),
    ("gateway", "redis", 6379),
    ("gateway", "redis", 26379),
    ("gateway", "embedding", 8001),  # attribution's sentence vectors
    ("retriever", "embedding", 8001),
    ("retriever", "qdrant", 6333),
    ("retriever", "qdrant", 6334),
    ("llm", "redis", 6379),
    ("llm", "redis", 26379),
    ("redis", "redis", 6379),
    ("redis", "redis", 26379),
    ("qdrant", "qdrant", 6333),
    ("qdrant", "qdrant", 6334),
    ("qdrant", "qdrant", 6335),
}
BATCH_FLOWS = {("reindex", "qdrant", 6333), ("reindex", "qdrant", 6334)}


@ALL
def test_network_policies_deny_by_default_and_allow_only_the_flows_of_the_design(renders, overlay):
    render = renders[overlay]
    policies = render.all("NetworkPolicy")
    namespaces = {w["metadata"]["namespace"] for w in render.workloads()}
    for namespace in namespaces:
        deny = [p for p in policies if p["metadata"]["namespace"] == namespace and p["spec"]["podSelector"] == {}]
        assert any(
            set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} and not p["spec"].get("ingress") for p in deny
        )
    pods = _pods(render)
    allowed = set()
    for source, (source_labels, source_namespace, _) in pods.items():
        for target, (target_labels, target_namespace, ports) in pods.items():
            for port in ports:
                out = _allowed(
                    policies, "egress", source_labels, source_namespace, port, target_labels, target_namespace
                )
                into = _allowed(
                    policies, "ingress", target_labels, target_namespace, port, source_labels, source_namespace
                )
                if out and into:
                    allowed.add((source, target, port))
    expected = DESIGN_FLOWS | (BATCH_FLOWS if "reindex" in pods else set())
    assert allowed == expected
    # From outside the namespace: the public API, KEDA to Redis, Prometheus to the metrics ports.
    outside = [
        (None, {}, "gateway", 8000),
        ("monitoring", {}, "retriever", 8002),
        ("monitoring", {}, "llm", 8003),
        ("monitoring", {}, "embedding", 8001),
    ]
    for namespace, labels, target, port in outside:
        target_labels, target_namespace, _ = pods[target]
        assert _allowed(policies, "ingress", target_labels, target_namespace, port, labels, namespace), (target, port)
    # KEDA reads the queue depth from Prometheus: it has no way into Redis.
    redis_labels, redis_namespace, _ = pods["redis"]
    for port in (6379, 26379):
        assert not _allowed(policies, "ingress", redis_labels, redis_namespace, port, {}, "keda")
    qdrant_labels, qdrant_namespace, _ = pods["qdrant"]
    assert not _allowed(policies, "ingress", qdrant_labels, qdrant_namespace, 6333, {}, "some-other-namespace")
    # Every pod resolves names: CoreDNS, NodeLocal DNSCache on its link-local address, GKE Cloud DNS on the
    # metadata address, and the kube-dns ClusterIP (NodeLocal DNSCache in interception mode).
    dns = {"k8s-app": "kube-dns"}
    for name, (labels, namespace, _) in pods.items():
        if namespace == k8s.NAMESPACE:
            assert _allowed(policies, "egress", labels, namespace, 53, dns, "kube-system"), name
            for protocol in ("UDP", "TCP"):
                for address in DNS_ADDRESSES:
                    assert _egress_to_address(policies, labels, namespace, address, 53, protocol), (name, address)
    # Those addresses are no way out to anything else (the metadata server answers on 80).
    labels, namespace, _ = pods["gateway"]
    for address in DNS_ADDRESSES:
        for port in (80, 443):
            assert not _egress_to_address(policies, labels, namespace, address, port, "TCP"), address


NODE_LOCAL_DNS = "169.254.20.10"
GKE_CLOUD_DNS = "169.254.169.254"
KUBE_DNS_CLUSTER_IP = "10.96.0.10"  # base/cluster-dns.yaml's default
DNS_ADDRESSES = (NODE_LOCAL_DNS, GKE_CLOUD_DNS, KUBE_DNS_CLUSTER_IP)


def test_the_kube_dns_cluster_ip_is_one_setting(tmp_path):
    """A cluster whose kube-dns Service has another ClusterIP sets it in base/cluster-dns.yaml only."""
    copy = tmp_path / "k8s"
    shutil.copytree(k8s.K8S, copy)
    setting = copy / "base" / "cluster-dns.yaml"
    setting.write_text(setting.read_text().replace("kube-dns-cluster-ip: 10.96.0.10", "kube-dns-cluster-ip: 10.0.0.10"))
    render = k8s.Render("custom", k8s.render(copy / "overlays" / "gpu-cluster"))
    policies = render.all("NetworkPolicy")
    labels = pod_template(render.get("Deployment", "gateway"))["metadata"]["labels"]
    for protocol in ("UDP", "TCP"):
        assert _egress_to_address(policies, labels, k8s.NAMESPACE, "10.0.0.10", 53, protocol)
    assert not _egress_to_address(policies, labels, k8s.NAMESPACE, KUBE_DNS_CLUSTER_IP, 53, "UDP")
    assert render.find("ConfigMap", "cluster-dns") is None  # read by kustomize, never applied


def _egress_to_address(policies, pod_labels, pod_namespace, address: str, port: int, protocol: str) -> bool:
    """Whether some egress rule lets a pod reach an IP address outside the cluster's pods (ipBlock)."""
    for policy in policies:
        spec = policy["spec"]
        if policy["metadata"]["namespace"] != pod_namespace or "Egress" not in spec.get("policyTypes", []):
            continue
        if not label_selector_matches(spec["podSelector"], pod_labels):
            continue
        for rule in spec.get("egress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports):
                continue
            ip = ipaddress.ip_address(address)
            for peer in rule.get("to", []):
                block = peer.get("ipBlock")
                if not block or ip not in ipaddress.ip_network(block["cidr"]):
                    continue
                if not any(ip in ipaddress.ip_network(e) for e in block.get("except", [])):
                    return True
    return False


# --- metrics to the autoscalers ----------------------------------------------------------------


EXPORTED_SERIES = {
    "rag_http_requests_total",
    "rag_http_request_duration_seconds_bucket",
    "rag_embedding_requests_in_flight",
    "rag_embedding_batch_wait_seconds_bucket",
}
# The label kube-prometheus-stack selects monitors by (README: its release name).
PROMETHEUS_RELEASE = {"release": "kps"}


@ALL
def test_metrics_to_autoscalers_service_monitors_and_adapter_rules_for_the_hpa_metrics(renders, overlay):
    render = renders[overlay]
    # Every service is scraped where it serves /metrics, each pod once.
    for name in ("gateway", "embedding", "retriever"):
        monitor = render.get("ServiceMonitor", name)
        selected = [
            s
            for s in render.all("Service")
            if label_selector_matches(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        wanted = [s for s in render.all("Service") if s["spec"]["selector"].get("app.kubernetes.io/name") == name]
        assert sorted(s["metadata"]["name"] for s in selected) == sorted(s["metadata"]["name"] for s in wanted)
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        for service in selected:
            assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
        # The series' own "service" label survives: the operator's target label of that name is dropped.
        assert {"action": "labeldrop", "regex": "service"} in endpoint.get("relabelings", []), name
    monitor = render.get("PodMonitor", "llm")
    assert label_selector_matches(monitor["spec"]["selector"], labels_of(render, "Deployment", "llm"))
    worker = render.container("Deployment", "llm", "worker")
    assert {"port": "http", "path": "/metrics", "interval": "15s"} in monitor["spec"]["podMetricsEndpoints"]
    assert worker["ports"][0] == {"name": "http", "containerPort": 8003}
    # Prometheus finds the monitors: they carry the label it selects by.
    for kind in ("ServiceMonitor", "PodMonitor"):
        for found in render.all(kind):
            labels = found["metadata"]["labels"]
            assert PROMETHEUS_RELEASE.items() <= labels.items(), found["metadata"]["name"]
            assert "service" not in labels
    # prometheus-adapter serves each Pods metric an HPA names, from the services' own series.
    config = render.get("ConfigMap", "ragpod-adapter-rules", "monitoring")["data"]["config.yaml"]
    rules = {r["name"]["as"]: r for r in yaml.safe_load(config)["rules"]}
    wanted = {
        m["pods"]["metric"]["name"]
        for hpa in render.all("HorizontalPodAutoscaler")
        for m in hpa["spec"]["metrics"]
        if m["type"] == "Pods"
    }
    assert wanted and wanted <= set(rules)
    for name in wanted:
        rule = rules[name]
        series = rule["seriesQuery"].split("{")[0]
        assert series in EXPORTED_SERIES
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"]
        # An idle pod reads 0, per pod (tests/e2e/test_autoscaling_metrics.py evaluates it).
        assert rule["metricsQuery"].endswith(" or max(up{<<.LabelMatchers>>}) by (<<.GroupBy>>) * 0"), name
    if overlay in k8s.GPU_OVERLAYS:  # no rule left that no autoscaler reads (cpu-only has no GPU embedding)
        assert set(rules) == wanted
    assert "rate(" in rules["rag_http_requests_per_second"]["metricsQuery"]


@ALL
def test_qdrant_metrics_are_scraped_without_credentials_by_default(renders, overlay):
    """prometheus-operator rejects a whole ServiceMonitor whose credentials Secret is absent, optional or
    not: without a Qdrant key (the default) the monitor must name none."""
    (endpoint,) = renders[overlay].get("ServiceMonitor", "qdrant")["spec"]["endpoints"]
    assert not {"authorization", "bearerTokenSecret", "basicAuth"} & set(endpoint)


def test_qdrant_with_keys_gives_prometheus_the_read_only_key(tmp_path):
    render = k8s.with_components(tmp_path, "gpu-cluster", "qdrant-auth")
    env = {e["name"]: e for e in render.container("StatefulSet", "qdrant", "qdrant")["env"]}
    admin = env["QDRANT__SERVICE__API_KEY"]["valueFrom"]["secretKeyRef"]
    read_only = env["QDRANT__SERVICE__READ_ONLY_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert read_only["name"] == admin["name"] == "qdrant-auth" and read_only["key"] != admin["key"]
    assert not read_only.get("optional")  # the component is for clusters with the Secret
    (endpoint,) = render.get("ServiceMonitor", "qdrant")["spec"]["endpoints"]
    credentials = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer"
    assert (credentials["name"], credentials["key"]) == (read_only["name"], read_only["key"])
    assert not credentials.get("optional")


def test_readme_documents_prerequisites_and_every_overlay():
    readme = README.read_text()
    for needed in (
        "GPU operator",
        "device plugin",
        "KEDA",
        "Prometheus operator",
        "prometheus-adapter",
        "Cluster Autoscaler",
    ):
        assert needed in readme, needed
    for overlay in k8s.OVERLAYS:
        assert f"kubectl apply -k deploy/k8s/overlays/{overlay}" in readme, overlay
    assert Path(k8s.K8S / "checkov.sh").is_file()


def test_prerequisites_list_everything_a_cluster_needs_in_one_place(renders):
    readme = README.read_text()
    section = readme[readme.index("## Prerequisites") :]
    section = section[: section.index("\n## ", 3)]
    for needed in (
        "KEDA ≥ 2.17",  # fallback.behavior
        "Prometheus operator",
        "GPU Operator (device plugin and GPU feature discovery)",
        "NetworkPolicy enforcement",
        "EKS",
        "enableNetworkPolicy",
        "registry",
        "components/registry",
        "169.254.20.10",
        "169.254.169.254",
        "base/cluster-dns.yaml",
        "GKE",
        "Bottlerocket",
        "components/gpu-writable-root",
        "`llm-models`",
    ):
        assert needed in section, needed
    # The version stated is the one the manifests need.
    scaled = renders["gpu-cluster"].get("ScaledObject", "llm")
    assert "behavior" in scaled["spec"]["fallback"]
    # The operator notes say what an upgrade from the last deployment must do.
    notes = readme[readme.index("### This version") : readme.index("### The version before")]
    notes_needed = ("llm-weights", "delete pvc llm-models", "gateway-api-keys", "llm-api-key", "read-only-api-key")
    for needed in (*notes_needed, "KEDA 2.17"):
        assert needed in notes, needed


# The vLLM release the manifests pin, and the `vllm serve` flags they pass, as checked against that release's
# server arguments (README, "Choices behind them": NVIDIA driver floors). A new tag or a new flag fails here
# until it is checked again and written down.
VLLM_RELEASE = "v0.33.0"
VLLM_SERVE_FLAGS = {
    "--served-model-name",
    "--host",
    "--port",
    "--gpu-memory-utilization",
    "--max-model-len",
    "--api-key",
}
VLLM_DRIVER_FLOOR = "580.65.06"  # CUDA 13.0, the default build of vLLM's images since v0.20.0


WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}


def vllm_containers(render: k8s.Render) -> list[dict]:
    return [
        container
        for obj in render.objects
        if obj["kind"] in WORKLOADS
        for container in all_containers(pod_template(obj)["spec"])
        if container["image"].startswith("vllm/vllm-openai:")
    ]


@ALL
def test_every_vllm_image_is_the_checked_release_passing_only_checked_flags(renders, overlay, tmp_path):
    render = renders[overlay]
    found = vllm_containers(render)
    if overlay in k8s.GPU_OVERLAYS:  # the LLM pod's model server and the headroom placeholder
        assert len(found) >= 2
        found += vllm_containers(k8s.with_components(tmp_path, overlay, "model-fetch"))
    assert {c["image"] for c in found} <= {f"vllm/vllm-openai:{VLLM_RELEASE}"}
    for container in found:
        if container["name"] == "model-server":
            flags = {a.split("=", 1)[0] for a in container["args"] if a.startswith("--")}
            assert flags == VLLM_SERVE_FLAGS, flags
            assert not container["args"][0].startswith("--")  # the model, positional
            assert container["startupProbe"]["httpGet"]["path"] == "/health"


def test_compose_gpu_runs_the_same_vllm_release_and_the_docs_state_its_driver_floor():
    compose = (k8s.REPO / "docker-compose.gpu.yml").read_text()  # compose's own tags (!reset): read as text
    assert set(re.findall(r"image: (vllm/\S+)", compose)) == {f"vllm/vllm-openai:{VLLM_RELEASE}"}
    assert set(re.findall(r"^\s+- (--[a-z-]+)", compose, re.MULTILINE)) <= VLLM_SERVE_FLAGS
    readme = (k8s.K8S / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.strip().startswith(f"| `vllm/vllm-openai:{VLLM_RELEASE}` ")]
    assert f"≥ {VLLM_DRIVER_FLOOR}" in row
    assert any("`ragpod/embedding:<version>-gpu` (default `cu126`)" in line for line in readme.splitlines())


def test_the_keys_file_comes_from_a_secret_mounted_read_only_where_the_gateway_reads_it(tmp_path):
    render = k8s.with_components(tmp_path, "gpu-cluster", "tenant-keys")
    pod = k8s.pod_template(render.get("Deployment", "gateway"))["spec"]
    gateway = render.container("Deployment", "gateway", "gateway")
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tenant-keys"]
    assert volume["secret"]["secretName"] == "gateway-tenant-keys" and not volume["secret"].get("optional")
    (mount,) = [m for m in gateway["volumeMounts"] if m["name"] == "tenant-keys"]
    assert mount["readOnly"] is True
    (item,) = volume["secret"]["items"]
    assert env["RAG_API_KEYS_FILE"] == f"{mount['mountPath']}/{item['path']}"
    # RAG_API_KEYS (the default tenant's keys) still comes from its own Secret, as without the component.
    assert {"secretRef": {"name": "gateway-api-keys", "optional": True}} in gateway["envFrom"]
