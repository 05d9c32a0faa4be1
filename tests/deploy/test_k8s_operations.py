"""What a live cluster would show and a schema cannot: stops, rollouts, node loss, zones, runtimes.

Each test reads the rendered overlays (and, for the optional components, a
render of an overlay with the component added) the way the kubelet, the
Deployment controller, the scheduler and Qdrant would act on them.
"""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cloudcoil.models.keda.v1alpha1 import ScaledObject

from deploy.manifests import all_containers, pod_template, quantity, resources
from services.common.settings import ServiceSettings
from services.embedding.config import Settings as EmbeddingSettings
from services.gateway.config import Settings as GatewaySettings
from services.llm.config import Settings as LlmSettings
from services.llm.openai_engine import READY_TIMEOUT_SECONDS
from services.llm.server.config import Settings as LlmServerSettings
from services.retriever.config import Settings as RetrieverSettings
from tests.fixtures import k8s_manifests as k8s
from tests.fixtures.k8s_manifests import Render, gpu_resources, settings_env_names

GPU = pytest.mark.parametrize("overlay", k8s.GPU_OVERLAYS)
ALL = pytest.mark.parametrize("overlay", k8s.OVERLAYS)
DEFAULT_PROGRESS_DEADLINE = 600  # Deployment spec default
DEFAULT_GRACE = 30  # pod spec default


def setting(render: Render, configmap: str, settings: type[ServiceSettings], variable: str) -> float:
    """A setting as the service reads it: its ConfigMap's value, else the settings class's default."""
    data = render.get("ConfigMap", configmap)["data"]
    field = settings_env_names(settings)[variable]
    return float(data.get(variable, settings.model_fields[field].default))


def pre_stop(container: dict[str, Any]) -> float:
    hook = (container.get("lifecycle") or {}).get("preStop") or {}
    return float((hook.get("sleep") or {}).get("seconds", 0))


def grace(workload: dict[str, Any]) -> float:
    return float(pod_template(workload)["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE))


# --- Qdrant: a node away leaves a copy of every shard ------------------------------------------------


@ALL
def test_qdrant_collections_are_replicated_to_fit_the_statefulset(renders, overlay):
    render = renders[overlay]
    qdrant = render.get("StatefulSet", "qdrant")
    peers = int(qdrant["spec"]["replicas"])
    data = render.get("ConfigMap", "retriever-config")["data"]
    env = {k: v for k, v in data.items() if k.startswith("RAG_QDRANT_")}
    # The retriever reads them (and refuses a write consistency above the replication factor).
    settings = RetrieverSettings(**{settings_env_names(RetrieverSettings)[k]: v for k, v in env.items()})  # type: ignore[arg-type]
    assert {"RAG_QDRANT_REPLICATION_FACTOR", "RAG_QDRANT_SHARDS", "RAG_QDRANT_WRITE_CONSISTENCY"} <= set(env)
    factor, shards, consistency = (
        settings.qdrant_replication_factor,
        settings.qdrant_shards,
        settings.qdrant_write_consistency,
    )
    # No more copies than peers (one peer per node: required anti-affinity).
    assert factor <= peers
    # Every peer holds shards, so that none idles while the others carry the load.
    assert shards * factor >= peers
    if peers > 1:
        # As many peers may be away at once as the PodDisruptionBudget allows: a copy of each
        # shard stays, and writes, which need `consistency` copies, go on meanwhile.
        budget = render.get("PodDisruptionBudget", "qdrant")["spec"]
        away = int(budget.get("maxUnavailable", peers - int(budget.get("minAvailable", peers))))
        assert away >= 1
        assert factor >= away + 1, "a drained node takes shards with it"
        assert consistency <= factor - away, "writes stop while a node is away"
    if overlay in k8s.GPU_OVERLAYS:
        assert (peers, factor) == (3, 2)


# --- stopping: deadline < drain < grace period -------------------------------------------------------


def _chains(render: Render) -> dict[str, list[tuple[str, float, float, float]]]:
    """Deployment -> [(container, longest request it may hold, how long it keeps serving on SIGTERM, preStop)].

    The longest request of a service is the deadline its caller gives it
    (the gateway's own ask deadline for the gateway). The LLM worker's jobs
    are bounded by its model-server timeout; it drains for
    RAG_LLM_DRAIN_SECONDS. A model server beside it must outlast that drain.
    """
    gateway_drain = setting(render, "gateway-config", GatewaySettings, "RAG_SHUTDOWN_GRACE_SECONDS")
    retriever_drain = setting(render, "retriever-config", RetrieverSettings, "RAG_SHUTDOWN_GRACE_SECONDS")
    embedding_drain = setting(render, "embedding-config", EmbeddingSettings, "RAG_SHUTDOWN_GRACE_SECONDS")
    ask = setting(render, "gateway-config", GatewaySettings, "RAG_ASK_TIMEOUT_SECONDS")
    gateway_calls = setting(render, "gateway-config", GatewaySettings, "RAG_UPSTREAM_TIMEOUT_SECONDS")
    retriever_calls = setting(render, "retriever-config", RetrieverSettings, "RAG_UPSTREAM_TIMEOUT_SECONDS")
    generation = setting(render, "llm-config", LlmSettings, "RAG_LLM_REQUEST_TIMEOUT_SECONDS")
    worker_drain = setting(render, "llm-config", LlmSettings, "RAG_LLM_DRAIN_SECONDS")
    chains: dict[str, list[tuple[str, float, float, float]]] = {}
    for deployment in render.all("Deployment"):
        name = deployment["metadata"]["name"]
        containers = {c["name"]: c for c in all_containers(pod_template(deployment)["spec"])}
        if name == "gateway":
            chain = [("gateway", ask, gateway_drain, pre_stop(containers["gateway"]))]
        elif name == "retriever":
            chain = [("retriever", gateway_calls, retriever_drain, pre_stop(containers["retriever"]))]
        elif name in ("embedding", "embedding-gpu"):
            chain = [("embedding", retriever_calls, embedding_drain, pre_stop(containers["embedding"]))]
        elif name == "llm":
            server = containers["model-server"]
            # The model server answers until its preStop ends, then shuts down (vLLM at once; the
            # project's server within its RAG_SHUTDOWN_GRACE_SECONDS).
            server_stop = 0.0
            if k8s.ragpod_repository(server["image"]):
                server_stop = setting(render, "llm-config", LlmServerSettings, "RAG_SHUTDOWN_GRACE_SECONDS")
            chain = [
                ("worker", generation, worker_drain, pre_stop(containers["worker"])),
                ("model-server", worker_drain, server_stop, pre_stop(server)),
            ]
        elif name == "gpu-headroom":
            continue  # a pause container: nothing to stop gracefully
        else:
            raise AssertionError(f"{render.overlay}: Deployment {name} has no stop chain in this test")
        chains[name] = chain
    return chains


@ALL
def test_every_deployment_stops_without_cutting_a_request(renders, overlay):
    render = renders[overlay]
    chains = _chains(render)
    assert {"gateway", "retriever", "embedding", "llm"} <= set(chains)
    for name, chain in chains.items():
        period = grace(render.get("Deployment", name))
        for container, deadline, drain, sleep in chain:
            where = f"{overlay} {name}/{container}"
            if container == "model-server":
                server = {c["name"]: c for c in all_containers(pod_template(render.get("Deployment", name))["spec"])}[
                    container
                ]
                if server.get("restartPolicy") == "Always":
                    # A native sidecar: stopped only once the worker has exited, so it serves the whole drain
                    # without a preStop; worker drain and its own stop fit the grace period.
                    assert sleep == 0, f"{where}: a sidecar's preStop {sleep} s only delays the pod's end"
                    assert deadline + drain < period, f"{where}: {deadline} + {drain} s does not fit {period} s"
                    continue
                # A plain container beside the worker: keeps answering (preStop) while the worker drains.
                assert sleep > deadline, f"{where}: preStop {sleep} s ends before the worker's {deadline} s drain"
                assert sleep + drain < period, f"{where}: {sleep} + {drain} s does not fit {period} s"
                continue
            assert deadline < drain, f"{where}: a {deadline} s request outlives the {drain} s drain"
            assert sleep + drain < period, f"{where}: preStop {sleep} + drain {drain} s >= grace period {period} s"
        # A Service's endpoints drop the pod while it sleeps: every Service-backed container has a preStop.
        if name != "llm":
            assert all(sleep > 0 for _, _, _, sleep in chain), f"{overlay} {name}: no preStop"


def test_the_stop_chain_check_catches_the_old_gateway(renders):
    """30 s of grace and 20 s of drain against a 120 s ask: the check must refuse it."""
    render = renders["gpu-cluster"]
    gateway = render.get("Deployment", "gateway")
    old = Render("old", [o for o in render.objects if o is not gateway])
    patched = {**gateway, "spec": {**gateway["spec"], "template": {**gateway["spec"]["template"]}}}
    patched["spec"]["template"]["spec"] = {**gateway["spec"]["template"]["spec"], "terminationGracePeriodSeconds": 30}
    old.objects.append(patched)
    config = old.get("ConfigMap", "gateway-config")
    old.objects.remove(config)
    data = {k: v for k, v in config["data"].items() if k != "RAG_SHUTDOWN_GRACE_SECONDS"}
    old.objects.append({**config, "data": data})
    ((_, deadline, drain, sleep),) = _chains(old)["gateway"]
    assert (deadline, drain) == (120, 20) and not deadline < drain
    assert sleep + drain < grace(patched)  # the grace period alone would have passed


# --- rollouts ---------------------------------------------------------------------------------------


def startup_budget(container: dict[str, Any]) -> float:
    """Seconds the kubelet allows a container to start before it restarts it."""
    probe = container.get("startupProbe") or container.get("livenessProbe")
    if probe is None:
        return 0.0
    return float(probe.get("initialDelaySeconds", 0)) + float(probe.get("periodSeconds", 10)) * float(
        probe.get("failureThreshold", 3)
    )


@ALL
def test_rollouts_are_not_reported_failed_while_a_pod_is_still_allowed_to_start(renders, overlay):
    for deployment in renders[overlay].all("Deployment"):
        spec = pod_template(deployment)["spec"]
        # Native sidecars start one after the other, each past its startupProbe, before the containers.
        sidecars = [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
        budget = sum(startup_budget(c) for c in sidecars) + max(
            (startup_budget(c) for c in spec["containers"]), default=0.0
        )
        deadline = float(deployment["spec"].get("progressDeadlineSeconds", DEFAULT_PROGRESS_DEADLINE))
        assert deadline > budget, f"{overlay} {deployment['metadata']['name']}: {deadline} s <= {budget} s to start"
    llm = renders[overlay].get("Deployment", "llm")
    server = k8s.container_named(pod_template(llm)["spec"], "model-server")
    if server["image"].startswith("vllm/"):
        assert startup_budget(server) >= 900  # loading a 7B model onto a GPU takes minutes


# --- headroom ----------------------------------------------------------------------------------------


def pod_requests(pod_spec: dict[str, Any]) -> dict[str, float]:
    """What the scheduler reserves for a pod: its containers and sidecars, or its largest init step."""
    running: dict[str, float] = {}
    sidecars: dict[str, float] = {}
    init_peak: dict[str, float] = {}
    for init in pod_spec.get("initContainers") or []:
        asked = resources(init, "requests")
        if init.get("restartPolicy") == "Always":
            for key, value in asked.items():
                sidecars[key] = sidecars.get(key, 0) + value
        else:
            for key, value in asked.items():
                init_peak[key] = max(init_peak.get(key, 0), value + sidecars.get(key, 0))
    running.update(sidecars)
    for container in pod_spec.get("containers") or []:
        for key, value in resources(container, "requests").items():
            running[key] = running.get(key, 0) + value
    return {key: max(running.get(key, 0), init_peak.get(key, 0)) for key in set(running) | set(init_peak)}


@GPU
def test_the_headroom_placeholder_frees_room_for_a_whole_llm_pod(renders, overlay):
    render = renders[overlay]
    llm = pod_requests(render.pod_spec("Deployment", "llm"))
    (pause,) = render.pod_spec("Deployment", "gpu-headroom")["containers"]
    held = resources(pause, "requests")
    for resource in ("cpu", "memory", *gpu_resources(pause)):
        assert held[resource] >= llm[resource], f"{overlay}: the placeholder holds {held[resource]} {resource}"
    assert (held["cpu"], held["memory"]) == (llm["cpu"], llm["memory"])  # no more than one pod needs
    assert resources(pause, "limits") == held
    # It runs the model server's image, idle: the warm node already holds the image the LLM pod pulls.
    server = k8s.container_named(render.pod_spec("Deployment", "llm"), "model-server")
    assert pause["image"] == server["image"] and pause["command"] == ["sleep", "infinity"]


# --- the model volume and the zones ------------------------------------------------------------------


_with_components = k8s.with_components


def _zones_open(render: Render) -> list[str]:
    """Why the LLM pods could not spread over zones because of their model volume (empty: they can)."""
    problems = []
    pod = render.pod_spec("Deployment", "llm")
    volumes = {v["name"]: v for v in pod["volumes"]}
    source = volumes["models"]
    if "persistentVolumeClaim" in source:
        claim = render.get("PersistentVolumeClaim", source["persistentVolumeClaim"]["claimName"])
        spec = claim["spec"]
        if spec.get("accessModes") != ["ReadOnlyMany"]:
            problems.append("the claim is not ReadOnlyMany: one node at a time")
        # A default StorageClass provisions a new, empty, zonal disk for an unbound claim.
        if spec.get("storageClassName") != "" or not spec.get("volumeName"):
            problems.append("the claim may be provisioned by a StorageClass (an empty zonal disk)")
        volume = render.find("PersistentVolume", spec.get("volumeName", ""))
        if volume is not None:
            terms = ((volume["spec"].get("nodeAffinity") or {}).get("required") or {}).get("nodeSelectorTerms") or []
            zones = {
                value
                for term in terms
                for e in term.get("matchExpressions", [])
                if e["key"] == "topology.kubernetes.io/zone"
                for value in e.get("values", [])
            }
            if len(zones) == 1:
                problems.append(f"the volume is pinned to zone {zones.pop()}")
    elif "emptyDir" in source:
        fetch = [c for c in pod.get("initContainers", []) if any(m["name"] == "models" for m in c["volumeMounts"])]
        if not fetch:
            problems.append("an empty models volume that nothing fills")
    else:
        problems.append(f"unknown models volume {sorted(source)}")
    return problems


@GPU
def test_the_llm_model_volume_leaves_the_zone_spread_possible(renders, overlay):
    render = renders[overlay]
    assert _zones_open(render) == []
    # The check sees the fault it guards against: a claim the default StorageClass would provision.
    claim = render.get("PersistentVolumeClaim", "llm-weights")
    unbound = {**claim, "spec": {k: v for k, v in claim["spec"].items() if k not in ("storageClassName", "volumeName")}}
    broken = Render("broken", [unbound if o is claim else o for o in render.objects])
    assert _zones_open(broken) == ["the claim may be provisioned by a StorageClass (an empty zonal disk)"]
    zonal = {
        "kind": "PersistentVolume",
        "metadata": {"name": "llm-models"},
        "spec": {
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}
                            ]
                        }
                    ]
                }
            }
        },
    }
    assert _zones_open(Render("zonal", [*render.objects, zonal])) == ["the volume is pinned to zone a"]


def test_the_model_fetch_component_fills_a_pod_local_volume_before_vllm_starts(tmp_path):
    render = _with_components(tmp_path, "gpu-cluster", "model-fetch")
    assert _zones_open(render) == []
    assert render.find("PersistentVolumeClaim", "llm-weights") is None
    pod = render.pod_spec("Deployment", "llm")
    fetch, sidecar = pod["initContainers"]
    assert sidecar["name"] == "model-server", "the download ends before vLLM starts"
    assert fetch.get("restartPolicy") is None, "a step before the containers, not a sidecar"
    assert {"name": "models", "mountPath": "/models"} in fetch["volumeMounts"]
    env = {e["name"]: e for e in fetch["env"]}
    assert env["RAG_LLM_MODEL_NAME"]["valueFrom"]["configMapKeyRef"]["name"] == "llm-config"
    assert env["HF_HUB_OFFLINE"]["value"] == "0"
    script = fetch["command"][-1]
    assert 'os.path.join("/models", name)' in script and "snapshot_download" in script
    # vLLM reads what was fetched, where its argument says.
    server = k8s.container_named(pod, "model-server")
    assert server["args"][0] == "/models/$(RAG_LLM_MODEL_NAME)"
    volume = {v["name"]: v for v in pod["volumes"]}["models"]
    assert quantity(volume["emptyDir"]["sizeLimit"]) >= 30 * 2**30
    # The download counts against the rollout's deadline too.
    llm = render.get("Deployment", "llm")
    assert llm["spec"]["progressDeadlineSeconds"] > startup_budget(server) + 15 * 60
    # Only HTTPS leaves the cluster, and only from the LLM pods.
    (egress,) = [p for p in render.all("NetworkPolicy") if p["metadata"]["name"] == "llm-model-fetch"]
    assert egress["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "llm"}}
    (rule,) = egress["spec"]["egress"]
    assert rule["ports"] == [{"port": 443, "protocol": "TCP"}]
    assert "10.0.0.0/8" in rule["to"][0]["ipBlock"]["except"]
    for container in all_containers(pod):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The scheduler places the pod on a node with disk for the weights as well as vLLM's /tmp.
    assert pod_ephemeral_request(pod) >= disk_volumes(pod)


def disk_volumes(pod_spec: dict[str, Any]) -> float:
    """Bytes the pod's emptyDirs on the node's disk may fill (memory-backed ones excluded)."""
    return sum(
        quantity(v["emptyDir"].get("sizeLimit", "0"))
        for v in pod_spec.get("volumes") or []
        if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
    )


def pod_ephemeral_request(pod_spec: dict[str, Any]) -> float:
    """ephemeral-storage the scheduler reserves for the running pod: its containers and sidecars."""
    running = list(pod_spec["containers"]) + [
        c for c in pod_spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"
    ]
    return sum(resources(c, "requests").get("ephemeral-storage", 0) for c in running)


@GPU
def test_the_llm_pod_asks_for_the_disk_its_volumes_fill(renders, overlay):
    """A node without the disk would evict the pod mid-load, or the download would fill the node."""
    pod = renders[overlay].pod_spec("Deployment", "llm")
    assert disk_volumes(pod) > 0
    assert pod_ephemeral_request(pod) >= disk_volumes(pod)


# --- container runtimes ------------------------------------------------------------------------------


def _gpu_containers(render: Render) -> dict[str, bool]:
    """workload/container -> readOnlyRootFilesystem, for every container that holds a GPU."""
    found = {}
    for workload in render.workloads():
        for container in all_containers(pod_template(workload)["spec"]):
            if gpu_resources(container) and workload["metadata"]["name"] != "gpu-headroom":
                key = f"{workload['metadata']['name']}/{container['name']}"
                found[key] = container["securityContext"]["readOnlyRootFilesystem"]
    return found


@pytest.mark.parametrize("overlay", ["gpu-cluster", "spot", "mig"])
def test_gpu_writable_root_component_switches_off_read_only_roots_on_gpu_containers_only(tmp_path, renders, overlay):
    before = renders[overlay]
    after = _with_components(tmp_path, overlay, "gpu-writable-root")
    gpu = _gpu_containers(after)
    assert gpu and all(value is False for value in gpu.values()), gpu
    assert set(gpu) == set(_gpu_containers(before)) and all(_gpu_containers(before).values())
    expected = {"embedding-gpu/embedding", "llm/model-server"} | ({"reindex/embedding"} if overlay == "spot" else set())
    assert set(gpu) == expected
    for workload in after.workloads():
        for container in all_containers(pod_template(workload)["spec"]):
            key = f"{workload['metadata']['name']}/{container['name']}"
            if key not in gpu:
                assert container["securityContext"]["readOnlyRootFilesystem"] is True, key


@GPU
def test_the_llm_pod_probes_outwait_the_worker_and_keeps_its_volume_owners(renders, overlay):
    pod = renders[overlay].pod_spec("Deployment", "llm")
    worker = k8s.container_named(pod, "worker")
    # /readyz asks vLLM for its model list: a probe that gives up first marks a loaded pod unready.
    assert worker["readinessProbe"]["timeoutSeconds"] > READY_TIMEOUT_SECONDS
    # fsGroup over a model volume: owners changed only when the volume's root does not match.
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


CRON_FIELDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))  # minute hour day-of-month month day-of-week


def cron_values(expression: str) -> list[set[int]]:
    """The values each of the five fields of a Linux cron expression (KEDA's cron trigger) selects; raises
    ValueError on anything else (six fields, names, an out-of-range value)."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"{expression!r}: {len(fields)} fields, not 5")
    selected = []
    for text, (low, high) in zip(fields, CRON_FIELDS, strict=True):
        values: set[int] = set()
        for part in text.split(","):
            span, _, step = part.partition("/")
            if span == "*":
                first, last = low, high
            else:
                first_text, _, last_text = span.partition("-")
                first = int(first_text)
                last = int(last_text) if last_text else (high if step else first)
            if not low <= first <= last <= high or (step and int(step) < 1):
                raise ValueError(f"{expression!r}: {part!r} outside {low}-{high}")
            values.update(range(first, last + 1, int(step or 1)))
        selected.append(values)
    return selected


def test_cron_values_reads_what_keda_reads_and_refuses_the_rest():
    assert cron_values("0 8 * * 1-5") == [{0}, {8}, set(range(1, 32)), set(range(1, 13)), {1, 2, 3, 4, 5}]
    assert cron_values("*/20 6,18 1 1 0")[0:2] == [{0, 20, 40}, {6, 18}]
    for wrong in ("0 8 * *", "0 24 * * *", "0 8 * * 1-5 2026", "60 8 * * *"):
        with pytest.raises(ValueError):
            cron_values(wrong)


def cron_triggers(scaled: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {t["name"]: t["metadata"] for t in scaled["spec"]["triggers"] if t["type"] == "cron"}


def check_cron_window(meta: dict[str, str]) -> None:
    """A window KEDA accepts: an IANA zone, two different five-field expressions, whole replicas."""
    ZoneInfo(meta["timezone"])  # raises for a zone the IANA database does not know
    start, end = cron_values(meta["start"]), cron_values(meta["end"])
    assert start != end, meta  # KEDA refuses a window that starts where it ends
    assert int(meta["desiredReplicas"]) >= 1


@ALL
def test_the_llm_tier_keeps_pods_while_serving_and_holds_peak_capacity_in_named_hours(renders, overlay):
    """Scale-to-zero policy, part one: never zero while serving (a cold LLM pod takes minutes, and the depth
    it scales on is exported by running workers only), and a cron trigger that holds peak capacity in the
    hours the operator names, between the queue's minimum and the tier's maximum."""
    render = renders[overlay]
    spec = render.get("ScaledObject", "llm")["spec"]
    assert spec["minReplicaCount"] >= 1
    peak = cron_triggers({"spec": spec})["peak-hours"]
    check_cron_window(peak)
    assert spec["minReplicaCount"] < int(peak["desiredReplicas"]) <= spec["maxReplicaCount"]
    # The gateway refuses at once, with Retry-After, a question no worker would take.
    assert render.get("ConfigMap", "gateway-config")["data"]["RAG_REQUIRE_LLM_WORKERS"] == "true"
    assert setting(render, "gateway-config", GatewaySettings, "RAG_NO_WORKERS_RETRY_AFTER_SECONDS") >= 60


def test_the_off_hours_component_rests_at_zero_only_outside_the_serving_hours(tmp_path, renders):
    """Part two, optional: zero outside a scheduled serving window. Within it the serving minimum holds (a
    cron trigger, as minReplicaCount no longer does); at zero no worker exports the queue's series, so no
    series reads as 0 (else the trigger errors and KEDA's fallback starts pods); the peak window stays."""
    before = renders["gpu-cluster"].get("ScaledObject", "llm")
    render = k8s.with_components(tmp_path, "gpu-cluster", "llm-off-hours")
    scaled = render.get("ScaledObject", "llm")
    spec = scaled["spec"]
    assert spec["minReplicaCount"] == 0
    crons = cron_triggers(scaled)
    assert set(crons) == {"peak-hours", "serving-hours"}
    serving = crons["serving-hours"]
    check_cron_window(serving)
    assert int(serving["desiredReplicas"]) == before["spec"]["minReplicaCount"]
    # Peak hours fall inside the serving hours, or the peak would wake the tier outside them.
    peak = crons["peak-hours"]
    assert min(cron_values(peak["start"])[1]) >= min(cron_values(serving["start"])[1])
    assert max(cron_values(peak["end"])[1]) <= max(cron_values(serving["end"])[1])
    assert cron_values(peak["start"])[4] <= cron_values(serving["start"])[4]  # its days among the serving days
    prometheus = [t for t in spec["triggers"] if t["type"] == "prometheus"]
    assert len(prometheus) == 2 and all(t["metadata"]["ignoreNullValues"] == "true" for t in prometheus)
    assert spec["fallback"] == before["spec"]["fallback"]  # Prometheus down is still an error, held
    # The models of the KEDA CRD read it as written (minus the fields newer than the models).
    newer = {k: v for k, v in spec["fallback"].items() if k != "behavior"}
    plain = {**scaled, "spec": {**spec, "fallback": newer}}
    dumped = ScaledObject.model_validate(plain).model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert dumped["spec"]["triggers"] == plain["spec"]["triggers"]
    assert dumped["spec"]["minReplicaCount"] == 0
    # Nothing else changes: the gateway already refuses questions while no worker is live.
    assert render.get("ConfigMap", "gateway-config") == renders["gpu-cluster"].get("ConfigMap", "gateway-config")


@ALL
def test_the_gateways_tmp_holds_every_upload_it_admits_at_once(renders, overlay):
    """Uploads spool their bodies to /tmp before parsing: the emptyDir holds RAG_MAX_CONCURRENT_UPLOADS bodies of
    RAG_MAX_BODY_BYTES (a full /tmp evicts the pod), and the number is bounded (0 would mean no bound)."""
    render = renders[overlay]
    uploads = setting(render, "gateway-config", GatewaySettings, "RAG_MAX_CONCURRENT_UPLOADS")
    body = setting(render, "gateway-config", GatewaySettings, "RAG_MAX_BODY_BYTES")
    assert uploads >= 1
    pod = render.pod_spec("Deployment", "gateway")
    (gateway,) = pod["containers"]
    (mount,) = [m for m in gateway["volumeMounts"] if m["mountPath"] == "/tmp"]
    (tmp,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    size = quantity(tmp["emptyDir"]["sizeLimit"])
    assert size >= uploads * body + 16 * 2**20, (size, uploads, body)  # and room for the rest
    if overlay in k8s.GPU_OVERLAYS:  # the scheduler counts the disk it needs
        assert resources(gateway, "requests")["ephemeral-storage"] >= size
