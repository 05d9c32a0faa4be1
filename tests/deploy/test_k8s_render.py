"""Every overlay renders, and every object it renders is valid for the API that will receive it."""

from __future__ import annotations

import copy as copy_module
import functools
import importlib
from collections import Counter

import kubernetes_validate
import kubernetes_validate.utils
import pytest
from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
from cloudcoil.models.prometheus_operator.v1 import PodMonitor, ServiceMonitor
from kubernetes_validate.utils import SchemaNotFoundError

from ragpod.tuning import MODEL_TUNING
from tests.fixtures import k8s_manifests as k8s

# Custom resources, checked against the models generated from their CRDs.
CRD_MODELS = {
    ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TriggerAuthentication,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
    ("monitoring.coreos.com/v1", "PodMonitor"): PodMonitor,
}
# Fields newer than the CRD models installed here (cloudcoil-models-keda stops at KEDA 2.16 for Python 3.11;
# its 2.20 models need Python 3.14): (kind, path) -> the values the newer CRD allows. Each is checked here,
# then removed before the model's own check.
NEWER_CRD_FIELDS = {
    # KEDA 2.17: what a failing scaler falls back to.
    ("ScaledObject", ("spec", "fallback", "behavior")): {
        "static",
        "currentReplicas",
        "currentReplicasIfHigher",
        "currentReplicasIfLower",
    },
}
CLUSTER_SCOPED = {"Namespace", "PriorityClass"}


def without_newer_fields(obj: dict) -> tuple[dict, list[str]]:
    """``obj`` without the fields of NEWER_CRD_FIELDS, and the problems found in their values."""
    copy, problems = copy_module.deepcopy(obj), []
    for (kind, path), allowed in NEWER_CRD_FIELDS.items():
        if obj["kind"] != kind:
            continue
        *parents, leaf = path
        holder = copy
        for key in parents:
            holder = holder.get(key) or {}
        if leaf in holder:
            value = holder.pop(leaf)
            if value not in allowed:
                problems.append(f"{kind}/{obj['metadata']['name']}: {'.'.join(path)}: {value!r} not in {allowed}")
    return copy, problems


# Secrets created by the operator of the cluster, not shipped (README: Secrets).
EXTERNAL_SECRETS = {"redis-auth", "gateway-api-keys", "qdrant-auth", "llm-api-key"}


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_overlay_renders_with_kustomize(renders, overlay):
    render = renders[overlay]
    ids = Counter((o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in render.objects)
    assert [i for i, n in ids.items() if n > 1] == []
    assert render.find("Deployment", "gateway") is not None
    assert render.find("Deployment", "llm") is not None


@pytest.fixture(scope="module")
def cached_schemas():
    """kubernetes-validate reads and parses its schema files on every call: read each once."""
    with pytest.MonkeyPatch.context() as patch:
        cached = functools.lru_cache(maxsize=None)(kubernetes_validate.utils.schema_contents)
        patch.setattr(kubernetes_validate.utils, "schema_contents", cached)
        yield


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_every_object_validates_against_the_kubernetes_or_crd_schema(renders, overlay, cached_schemas):
    problems = []
    for obj in renders[overlay].objects:
        ref = f"{obj['kind']}/{obj['metadata']['name']}"
        model = CRD_MODELS.get((obj["apiVersion"], obj["kind"]))
        if model is not None:
            obj, newer = without_newer_fields(obj)
            problems += newer
            try:
                parsed = model.model_validate(obj)
            except ValueError as exc:
                problems.append(f"{ref}: {exc}")
                continue
            # The models accept unknown fields and drop them: a typo shows as a difference.
            if parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") != obj:
                problems.append(f"{ref}: fields the {obj['kind']} CRD does not know")
            continue
        try:
            kubernetes_validate.validate(obj, k8s.KUBERNETES_VERSION, strict=True)
        except SchemaNotFoundError:
            problems.append(
                f"{ref}: {obj['apiVersion']} is neither a Kubernetes {k8s.KUBERNETES_VERSION} kind nor a known CRD"
            )
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{ref}: {path}: {exc.message}")
    assert problems == []


def test_the_crd_check_catches_a_wrong_value_of_a_newer_field(renders):
    scaled = renders["gpu-cluster"].get("ScaledObject", "llm")
    wrong = copy_module.deepcopy(scaled)
    wrong["spec"]["fallback"]["behavior"] = "currentReplicasIfHiger"
    assert without_newer_fields(wrong)[1] != []
    assert without_newer_fields(scaled)[1] == []


def test_the_crd_check_catches_an_unknown_field(renders):
    scaled = renders["gpu-cluster"].get("ScaledObject", "llm")
    typo = {**scaled, "spec": {**scaled["spec"], "maxReplicas": 8}}
    dumped = ScaledObject.model_validate(typo).model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert dumped != typo


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_namespaced_objects_name_their_namespace(renders, overlay):
    missing = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in renders[overlay].objects
        if o["kind"] not in CLUSTER_SCOPED and not o["metadata"].get("namespace")
    ]
    assert missing == []
    app = [o for o in renders[overlay].objects if o["kind"] in ("Deployment", "StatefulSet", "Service")]
    assert {o["metadata"]["namespace"] for o in app} <= {k8s.NAMESPACE, "rag-headroom"}


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_every_reference_resolves_within_the_render(renders, overlay):
    render = renders[overlay]
    names = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in render.objects}
    unresolved = []
    for workload in render.workloads():
        namespace = workload["metadata"]["namespace"]
        spec = k8s.pod_template(workload)["spec"]
        wanted = [("ServiceAccount", namespace, spec["serviceAccountName"])]
        if "priorityClassName" in spec:
            wanted.append(("PriorityClass", None, spec["priorityClassName"]))
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                wanted.append(("ConfigMap", namespace, volume["configMap"]["name"]))
            if "persistentVolumeClaim" in volume:
                wanted.append(("PersistentVolumeClaim", namespace, volume["persistentVolumeClaim"]["claimName"]))
        secrets = []
        for container in k8s.all_containers(spec):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    wanted.append(("ConfigMap", namespace, source["configMapRef"]["name"]))
                if "secretRef" in source:
                    secrets.append(source["secretRef"]["name"])
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    wanted.append(("ConfigMap", namespace, ref["configMapKeyRef"]["name"]))
                if "secretKeyRef" in ref:
                    secrets.append(ref["secretKeyRef"]["name"])
        unresolved += [w for w in wanted if w not in names]
        unresolved += [("Secret", namespace, s) for s in secrets if s not in EXTERNAL_SECRETS]
    assert unresolved == []


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_images_are_pinned(renders, overlay):
    unpinned = []
    for workload in renders[overlay].workloads():
        for container in k8s.all_containers(k8s.pod_template(workload)["spec"]):
            image = container["image"]
            tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
            if not tag or tag == "latest":
                unpinned.append(image)
    assert unpinned == []


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_ragpod_images_come_from_a_registry_a_cluster_can_pull_from(renders, overlay):
    """``ragpod/x`` alone means Docker Hub, where the images are not: the GPU overlays name a registry
    (one setting, components/registry); cpu-only keeps the bare names kind load docker-image gives."""
    images = {
        c["image"]
        for workload in renders[overlay].workloads()
        for c in k8s.all_containers(k8s.pod_template(workload)["spec"])
        if k8s.ragpod_repository(c["image"])
    }
    assert {k8s.ragpod_repository(i) for i in images} >= {"ragpod/gateway", "ragpod/retriever", "ragpod/llm"}
    hosts = {k8s.registry_host(i) for i in images}
    if overlay == "cpu-only":
        assert hosts == {""}
    else:
        assert len(hosts) == 1 and "" not in hosts, hosts  # every one from the one registry set


def test_registry_host_reads_names_as_a_container_runtime_does():
    assert k8s.registry_host("ragpod/llm:0.1.0") == ""
    assert k8s.registry_host("registry.example.com/ragpod/llm:0.1.0") == "registry.example.com"
    assert k8s.registry_host("localhost:5000/ragpod/llm:0.1.0") == "localhost:5000"
    assert k8s.ragpod_repository("registry.example.com/ragpod/llm:0.1.0-cpu") == "ragpod/llm"
    assert k8s.ragpod_repository("vllm/vllm-openai:v0.18.0") == ""


# The values every environment shares with docker-compose (its tests compare them).
CANONICAL = {
    "RAG_HOST": "0.0.0.0",
    "RAG_LOG_LEVEL": "info",
    "RAG_LLM_STREAM": "rag:llm:jobs",
    "RAG_LLM_GROUP": "rag-llm-workers",
    "RAG_LLM_DEAD_LETTER_STREAM": "rag:llm:dead",
    "RAG_ASK_TIMEOUT_SECONDS": "120",
    "RAG_LLM_BACKEND": "openai",
    "RAG_LLM_OPENAI_URL": "http://127.0.0.1:8004/v1",
    "RAG_LLM_MAX_TRIES": "3",
    "RAG_LLM_VISIBILITY_TIMEOUT_SECONDS": "60",
    "RAG_LLM_DRAIN_SECONDS": "130",
    "RAG_LLM_REQUEST_TIMEOUT_SECONDS": "120",
    "RAG_QDRANT_COLLECTION": "ragpod_chunks",
    "RAG_EMBEDDING_DEVICE": "auto",
}
PORTS = {"gateway": "8000", "embedding": "8001", "retriever": "8002", "llm": "8003"}


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_service_configmaps_hold_the_shared_settings(renders, overlay):
    render = renders[overlay]
    for service, port in PORTS.items():
        data = render.get("ConfigMap", f"{service}-config")["data"]
        assert data["RAG_PORT"] == port
        assert all(key.startswith("RAG_") for key in data)
        assert {k: v for k, v in data.items() if k in CANONICAL} == {k: v for k, v in CANONICAL.items() if k in data}
    gateway = render.get("ConfigMap", "gateway-config")["data"]
    assert gateway["RAG_RETRIEVER_URL"] == "http://retriever:8002"
    # Closed by default on a cluster: the gateway does not start without API keys; a laptop's kind may.
    assert gateway["RAG_REQUIRE_API_KEYS"] == ("true" if overlay in k8s.GPU_OVERLAYS else "false")
    keys = [
        source["secretRef"]
        for source in render.container("Deployment", "gateway", "gateway").get("envFrom", [])
        if "secretRef" in source
    ]
    assert [k["name"] for k in keys] == ["gateway-api-keys"]
    retriever = render.get("ConfigMap", "retriever-config")["data"]
    gpu = overlay in k8s.GPU_OVERLAYS
    assert retriever["RAG_EMBEDDING_URL"] == ("http://embedding-gpu:8001" if gpu else "http://embedding:8001")
    assert retriever["RAG_EMBEDDING_CPU_URL"] == ("http://embedding:8001" if gpu else "")
    assert retriever["RAG_QDRANT_URL"] == "http://qdrant:6333"
    llm = render.get("ConfigMap", "llm-config")["data"]
    assert llm["RAG_LLM_CONCURRENCY"] == ("16" if gpu else "4")

    assert (llm["RAG_LLM_MODEL_NAME"] == "smollm2-135m-instruct") is not gpu
    for name in ("gateway-config", "llm-config"):
        data = render.get("ConfigMap", name)["data"]
        assert data["RAG_REDIS_SENTINEL_MASTER"] == "ragpod"
        assert len(data["RAG_REDIS_SENTINELS"].split(",")) == 3


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_queue_limit_leaves_room_for_every_worker_at_full_scale(renders, overlay):
    """Backpressure must not cap the LLM below its KEDA maximum: the limit covers all jobs in flight and more."""
    render = renders[overlay]
    limit = int(render.get("ConfigMap", "gateway-config")["data"]["RAG_MAX_QUEUE_DEPTH"])
    concurrency = int(render.get("ConfigMap", "llm-config")["data"]["RAG_LLM_CONCURRENCY"])
    max_replicas = int(render.get("ScaledObject", "llm")["spec"]["maxReplicaCount"])
    assert limit > max_replicas * concurrency


def test_configmap_keys_are_settings_the_services_read(renders):
    """Every RAG_* key is a field of a service's Settings (env name = RAG_ + field, upper-cased)."""
    settings = importlib.import_module("services.common.settings")
    fields = set(settings.ServiceSettings.model_fields) | set(settings.QueueSettings.model_fields)
    for service in [*PORTS, "llm.server"]:
        fields |= set(importlib.import_module(f"services.{service}.config").Settings.model_fields)
    known = {f"RAG_{name.upper()}" for name in fields} | {"RAG_LLM_SERVE_PORT"}  # the model server's port
    used = set()
    for render in renders.values():
        for name in ("gateway-config", "embedding-config", "retriever-config", "llm-config"):
            used |= set(render.get("ConfigMap", name)["data"])
    assert used - known == set()


def test_every_ragpod_command_names_a_module_that_exists(renders):
    """A container that runs ``python -m services...`` runs code this repository has."""
    import importlib.util

    commands = set()
    for render in renders.values():
        for kind in k8s.POD_KINDS:
            for workload in render.all(kind):
                for container in k8s.all_containers(k8s.pod_template(workload)["spec"]):
                    command = list(container.get("command", [])) + list(container.get("args", []))
                    if command[:2] == ["python", "-m"] and command[2].startswith("services"):
                        commands.add(command[2])
    assert {"services.llm.server", "services.retriever.reindex"} <= commands
    missing = [module for module in sorted(commands) if importlib.util.find_spec(module) is None]
    assert missing == []


def container_env(render: k8s.Render, container: k8s.Obj) -> dict[str, str]:
    """What a container's process finds in its environment from the manifests: its ConfigMaps, then its env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(render.get("ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({item["name"]: item["value"] for item in container.get("env", []) if "value" in item})
    return env


def model_containers(render: k8s.Render) -> dict[str, k8s.Obj]:
    """The containers that run a model of ours, by image: both embedding variants, and the CPU model server."""
    containers = [
        render.container("Deployment", name, "embedding")
        for name in ("embedding", "embedding-gpu")
        if render.find("Deployment", name) is not None
    ]
    pod = render.pod_spec("Deployment", "llm")
    containers += [c for c in pod["containers"] if c.get("command", [])[:3] == ["python", "-m", "services.llm.server"]]
    return {c["image"].rpartition("/")[2]: c for c in containers}


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_model_containers_carry_the_model_tuning(renders, overlay):
    """The tuning of docs/tuning.md reaches every model container, and a CPU one runs as many OpenMP threads as
    its CPU limit allows (torch would otherwise start one per core of the node)."""
    render = renders[overlay]
    containers = model_containers(render)
    gpu_or_llm = "llm:0.1.0-cpu" if overlay == "cpu-only" else "embedding:0.1.0-gpu"
    assert set(containers) == {"embedding:0.1.0", gpu_or_llm}
    for container in containers.values():
        env = container_env(render, container)
        assert {name: env.get(name) for name in MODEL_TUNING} == MODEL_TUNING, container["name"]
        if not k8s.gpu_resources(container):
            assert env["OMP_NUM_THREADS"] == str(container["resources"]["limits"]["cpu"]), container["name"]
