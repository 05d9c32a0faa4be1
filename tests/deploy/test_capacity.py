"""deploy.capacity: the GPU workloads of every overlay fit its quota and node pools, and a broken one fails."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy import capacity
from tests.fixtures import k8s_manifests as k8s

CLI = [sys.executable, "-m", "deploy.capacity"]
OVERCOMMITTED = Path(__file__).parent / "fixtures" / "overcommitted"


def find(objects, kind, name, namespace=None):
    (found,) = [
        o
        for o in objects
        if o["kind"] == kind
        and o["metadata"]["name"] == name
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]
    return found


def mutable(renders, overlay):
    return copy.deepcopy(renders[overlay].objects)


def set_plan(objects, change):
    plan = find(objects, "ConfigMap", "gpu-capacity-plan")
    pools = yaml.safe_load(plan["data"]["node-pools.yaml"])
    change(pools["nodePools"])
    plan["data"]["node-pools.yaml"] = yaml.safe_dump(pools)


def raise_quota(objects, resource, value="100"):
    find(objects, "ResourceQuota", "gpu-quota", k8s.NAMESPACE)["spec"]["hard"][f"requests.{resource}"] = value


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_capacity_check_passes_on_every_overlay(renders, overlay):
    report = capacity.check(renders[overlay].objects, overlay)
    assert report.errors == []
    gpu_workloads = [line for line in report.lines if "/Deployment/llm:" in line]
    assert (gpu_workloads != []) is (overlay in k8s.GPU_OVERLAYS)


def test_capacity_cli_fails_on_a_deliberately_overcommitted_overlay():
    good = subprocess.run(
        [*CLI, str(k8s.K8S / "overlays" / "gpu-cluster")], capture_output=True, text=True, cwd=k8s.REPO
    )
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.startswith("gpu-cluster: OK")
    bad = subprocess.run([*CLI, str(OVERCOMMITTED)], capture_output=True, text=True, cwd=k8s.REPO)
    assert bad.returncode == 1
    assert "overcommitted: FAIL" in bad.stdout
    assert "the workloads may need 24 nvidia.com/gpu, the quota allows 20" in bad.stdout
    assert "rag-production/Deployment/llm may need 12 nvidia.com/gpu; pools gpu-a100 offer 8" in bad.stdout


def test_capacity_cli_reads_a_render_on_stdin(renders):
    text = yaml.safe_dump_all(renders["mig"].objects)
    done = subprocess.run([*CLI, "-"], input=text, capture_output=True, text=True, cwd=k8s.REPO)
    assert done.returncode == 0 and "stdin: OK" in done.stdout
    assert "nvidia.com/mig-1g.10gb 7/node (7 per GPU)" in done.stdout


def test_time_slices_are_counted_per_gpu(renders):
    objects = mutable(renders, "time-slicing")
    raise_quota(objects, "nvidia.com/gpu.shared")
    hpa = find(objects, "HorizontalPodAutoscaler", "embedding-gpu")
    # 3 L4 nodes x 1 GPU x 4 replicas = 12 slices.
    hpa["spec"]["maxReplicas"] = 12
    assert capacity.check(objects).errors == []
    hpa["spec"]["maxReplicas"] = 13
    (error,) = capacity.check(objects).errors
    assert "may need 13 nvidia.com/gpu.shared; pools gpu-l4-shared offer 12" in error


def test_time_slices_without_rename_are_not_the_shared_resource(renders):
    objects = mutable(renders, "time-slicing")
    plugin = find(objects, "ConfigMap", "ragpod-device-plugin-config", "gpu-operator")
    plugin["data"]["embedding-shared"] = plugin["data"]["embedding-shared"].replace(
        "renameByDefault: true", "renameByDefault: false"
    )
    errors = capacity.check(objects).errors
    assert any("embedding-gpu needs nvidia.com/gpu.shared, which no pool" in e for e in errors)


def test_mig_slices_are_counted_per_layout(renders):
    objects = mutable(renders, "mig")
    raise_quota(objects, "nvidia.com/mig-1g.10gb")
    hpa = find(objects, "HorizontalPodAutoscaler", "embedding-gpu")
    # 4 nodes x GPU 0 cut into 7.
    hpa["spec"]["maxReplicas"] = 28
    assert capacity.check(objects).errors == []
    hpa["spec"]["maxReplicas"] = 29
    assert any("offer 28" in e for e in capacity.check(objects).errors)
    # A layout naming a GPU the node does not have is refused.
    layouts = find(objects, "ConfigMap", "ragpod-mig-parted-config", "gpu-operator")
    original = layouts["data"]["config.yaml"]
    layouts["data"]["config.yaml"] = original.replace("devices: [0]", "devices: [0, 4]")
    assert any("names GPU 4, but the node has 4" in e for e in capacity.check(objects).errors)
    # Cutting three GPUs per node leaves one whole GPU per node: the LLM's 8 no longer fit.
    layouts["data"]["config.yaml"] = original.replace("devices: [0]", "devices: [0, 1, 2]").replace(
        "devices: [1, 2, 3]", "devices: [3]"
    )
    assert capacity.check(objects).errors == [
        "rag-production/Deployment/llm may need 8 nvidia.com/gpu; pools gpu-a100-mig offer 4 at their maximum size"
    ]


def test_a_rolling_update_surge_counts_against_the_quota(renders):
    objects = mutable(renders, "gpu-cluster")
    llm = find(objects, "Deployment", "llm")
    llm["spec"]["strategy"]["rollingUpdate"] = {"maxSurge": 1, "maxUnavailable": 0}
    errors = capacity.check(objects).errors
    assert any("may need 21 nvidia.com/gpu, the quota allows 20" in e for e in errors)


def shrink_l4(pools):
    for pool in pools:
        if pool["name"] == "gpu-l4":
            pool["maxNodes"] = 2


def test_workloads_sharing_a_pool_must_fit_together(renders):
    objects = mutable(renders, "gpu-cluster")
    # Let the embedding GPU pods onto the A100s as well (the manifests do not).
    pod = find(objects, "Deployment", "embedding-gpu")["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    term["matchExpressions"][0]["values"] = ["nvidia-l4", "nvidia-a100"]
    set_plan(objects, shrink_l4)
    # Embedding alone fits (8 L4 + 8 A100 >= 10), the LLM alone fits, both do not (18 > 16).
    (error,) = capacity.check(objects).errors
    assert "embedding-gpu + " in error or " + rag-production/Deployment/embedding-gpu" in error
    assert "may need 18 nvidia.com/gpu; pools gpu-a100, gpu-l4 offer 16" in error


def test_embedding_gpu_pods_never_count_on_the_llm_pool(renders):
    objects = mutable(renders, "gpu-cluster")
    report = capacity.check(objects)
    (line,) = [line for line in report.lines if line.startswith("rag-production/Deployment/embedding-gpu:")]
    assert line.endswith("pools: gpu-l4)")
    set_plan(objects, shrink_l4)
    errors = capacity.check(objects).errors
    assert errors[0] == (
        "rag-production/Deployment/embedding-gpu may need 10 nvidia.com/gpu; pools gpu-l4 offer 8 at their maximum size"
    )


def test_terminating_pods_count_against_the_quota_not_the_pools(renders):
    objects = mutable(renders, "gpu-cluster")
    report = capacity.check(objects)
    assert "rag-production/Deployment/llm: 8 pods (+1 terminating) x 1 nvidia.com/gpu = 9" in report.text()
    # A quota of exactly the autoscalers' maximums refuses the replacement of a pod being stopped.
    find(objects, "ResourceQuota", "gpu-quota", k8s.NAMESPACE)["spec"]["hard"]["requests.nvidia.com/gpu"] = "18"
    assert capacity.check(objects).errors == [
        "rag-production: the workloads may need 20 nvidia.com/gpu, the quota allows 18"
    ]
    # A pod with no grace period is gone at once; a Job replacing only failed pods waits for them.
    placeholder = find(renders["gpu-cluster"].objects, "Deployment", "gpu-headroom")
    assert placeholder["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 0
    assert "rag-headroom/Deployment/gpu-headroom: 1 pods x 1" in report.text()
    assert "rag-production/CronJob/reindex: 1 pods x 1" in capacity.check(renders["spot"].objects).text()


def test_a_gpu_pod_that_tolerates_no_gpu_pool_fails(renders):
    objects = mutable(renders, "gpu-cluster")
    find(objects, "Deployment", "llm")["spec"]["template"]["spec"]["tolerations"] = []
    errors = capacity.check(objects).errors
    assert any("llm needs nvidia.com/gpu, which no pool that admits it offers" in e for e in errors)


def test_a_gpu_resource_outside_the_quota_fails(renders):
    objects = mutable(renders, "time-slicing")
    del find(objects, "ResourceQuota", "gpu-quota", k8s.NAMESPACE)["spec"]["hard"]["requests.nvidia.com/gpu.shared"]
    errors = capacity.check(objects).errors
    assert errors == [
        "rag-production: 11 nvidia.com/gpu.shared with no ResourceQuota on requests.nvidia.com/gpu.shared"
    ]


@pytest.mark.parametrize(
    ("plugin", "layout", "expected"),
    [
        ({}, None, {"nvidia.com/gpu": (4, 1)}),
        (
            {
                "sharing": {
                    "timeSlicing": {"renameByDefault": True, "resources": [{"name": "nvidia.com/gpu", "replicas": 4}]}
                }
            },
            None,
            {"nvidia.com/gpu.shared": (16, 4)},
        ),
        (
            {"sharing": {"timeSlicing": {"resources": [{"name": "nvidia.com/gpu", "replicas": 2}]}}},
            None,
            {"nvidia.com/gpu": (8, 2)},
        ),
        (
            {"flags": {"migStrategy": "mixed"}},
            [{"devices": [0, 1], "mig-enabled": True, "mig-devices": {"1g.10gb": 7}}],
            {"nvidia.com/mig-1g.10gb": (14, 7), "nvidia.com/gpu": (2, 1)},
        ),
        (
            {"flags": {"migStrategy": "mixed"}},
            [{"devices": "all", "mig-enabled": True, "mig-devices": {"3g.40gb": 2}}],
            {"nvidia.com/mig-3g.40gb": (8, 2)},
        ),
        (
            {"flags": {"migStrategy": "single"}},
            [{"devices": "all", "mig-enabled": True, "mig-devices": {"2g.20gb": 3}}],
            {"nvidia.com/gpu": (12, 3)},
        ),
    ],
)
def test_node_offers_count_whole_gpus_time_slices_and_mig_instances(plugin, layout, expected):
    offers = capacity.node_offers(4, plugin, layout)
    assert {name: (o.per_node, o.per_gpu) for name, o in offers.items()} == expected
