"""Check that the GPU workloads of a kustomize overlay fit its GPU quota and GPU node pools.

    python -m deploy.capacity                               # every overlay in deploy/k8s/overlays
    python -m deploy.capacity deploy/k8s/overlays/mig       # one or more overlay directories
    kubectl kustomize deploy/k8s/overlays/mig | python -m deploy.capacity -

(from the repository root: ``deploy`` is a package, shared with the manifest tests).

For every workload that asks for a GPU (Deployment, StatefulSet, Job, CronJob)
the check takes the most pods it can have at once: the maximum of its
HorizontalPodAutoscaler or KEDA ScaledObject (else its own replicas or
parallelism), plus the pods a rolling update may surge, plus, for the quota,
the pods that may still be terminating while their replacements are created
(a terminating pod counts against the quota until it is gone). It multiplies them by
the GPU units one pod requests, in the units the NVIDIA device plugin
advertises on the nodes: whole GPUs (nvidia.com/gpu), time-slices (replicas
per GPU, renamed nvidia.com/gpu.shared with renameByDefault) or MIG instances
(nvidia.com/mig-<profile>, as many per GPU as the node's MIG layout cuts).

It fails when

* a namespace's ResourceQuota does not cover every GPU unit its workloads may
  hold at once (quota is checked when a pod is created, so a pod over it is
  never created, whatever preemption could free);
* the node pools of the capacity plan (ConfigMap ``gpu-capacity-plan``, at
  their maximum size) cannot hold the workloads that run side by side: for
  every group of workloads, what they need must fit in the pools that admit
  at least one of them (node labels against nodeSelector and required node
  affinity, taints against tolerations). Workloads of a negative priority
  (headroom placeholders, batch) yield to the others, so each of them only
  has to fit on its own;
* a workload asks for a GPU that no pool offers.

The time-slicing and MIG layouts are read from the same render: the device
plugin's ConfigMap ``ragpod-device-plugin-config`` (one configuration per key,
chosen per pool by ``devicePluginConfig``) and the MIG manager's
``ragpod-mig-parted-config`` (chosen per pool by ``migConfig``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy.manifests import (
    ManifestError,
    Obj,
    Taint,
    load,
    node_admits,
    overlays,
    render,
)

PLAN_CONFIGMAP = "gpu-capacity-plan"
PLAN_KEY = "node-pools.yaml"
DEVICE_PLUGIN_CONFIGMAP = "ragpod-device-plugin-config"
MIG_CONFIGMAP = "ragpod-mig-parted-config"
MIG_KEY = "config.yaml"
GPU_PREFIX = "nvidia.com/"
WHOLE_GPU = "nvidia.com/gpu"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "CronJob")


class CapacityError(ManifestError):
    """The manifests cannot be read as a capacity problem (not: they do not fit)."""


# --- reading the render -------------------------------------------------------------------------


def _name(obj: Obj) -> str:
    return str(obj["metadata"]["name"])


def _namespace(obj: Obj) -> str:
    return str(obj["metadata"].get("namespace", "default"))


def _configmap(objects: Iterable[Obj], name: str) -> Obj | None:
    found = [o for o in objects if o.get("kind") == "ConfigMap" and _name(o) == name]
    if len(found) > 1:
        raise CapacityError(f"more than one ConfigMap {name}")
    return found[0] if found else None


# --- node pools ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Offer:
    """What one node of a pool advertises for one resource name."""

    resource: str
    per_node: int
    per_gpu: int  # units a physical GPU is cut into (1, time-slice replicas, MIG instances, or both)


@dataclass
class Pool:
    name: str
    min_nodes: int
    max_nodes: int
    gpus_per_node: int
    labels: dict[str, str]
    taints: list[Taint]
    offers: dict[str, Offer] = field(default_factory=dict)

    def supply(self, resource: str) -> int:
        offer = self.offers.get(resource)
        return offer.per_node * self.max_nodes if offer else 0


def _device_plugin_config(objects: Sequence[Obj], key: str | None) -> Mapping[str, Any]:
    """One configuration of the device plugin; no ConfigMap means the plugin's defaults."""
    cm = _configmap(objects, DEVICE_PLUGIN_CONFIGMAP)
    if cm is None:
        if key not in (None, "default"):
            raise CapacityError(
                f"a pool asks for device plugin config {key!r}, but {DEVICE_PLUGIN_CONFIGMAP} is absent"
            )
        return {}
    data = cm.get("data") or {}
    key = key or "default"
    if key not in data:
        raise CapacityError(f"{DEVICE_PLUGIN_CONFIGMAP} has no configuration {key!r} (it has {sorted(data)})")
    return yaml.safe_load(data[key]) or {}


def _mig_layout(objects: Sequence[Obj], name: str) -> list[Mapping[str, Any]]:
    cm = _configmap(objects, MIG_CONFIGMAP)
    if cm is None:
        raise CapacityError(f"a pool asks for MIG layout {name!r}, but {MIG_CONFIGMAP} is absent")
    configs = (yaml.safe_load((cm.get("data") or {}).get(MIG_KEY, "")) or {}).get("mig-configs") or {}
    if name not in configs:
        raise CapacityError(f"{MIG_CONFIGMAP} has no layout {name!r} (it has {sorted(configs)})")
    return list(configs[name])


def node_offers(
    gpus: int, plugin: Mapping[str, Any], mig_layout: Sequence[Mapping[str, Any]] | None
) -> dict[str, Offer]:
    """The resources one node advertises: per name, its units and the units per physical GPU."""
    strategy = (plugin.get("flags") or {}).get("migStrategy", "none")
    # units[name] = [per node, per gpu]
    units: dict[str, list[int]] = {}

    def add(name: str, count: int, per_gpu: int) -> None:
        if count <= 0:
            return
        if name in units and units[name][1] != per_gpu:
            raise CapacityError(f"{name} would be cut in two ways on one node ({units[name][1]} and {per_gpu} per GPU)")
        units.setdefault(name, [0, per_gpu])[0] += count

    seen: set[int] = set()
    for group in mig_layout or []:
        devices = group.get("devices", "all")
        indices = list(range(gpus)) if devices == "all" else [int(i) for i in devices]
        for index in indices:
            if not 0 <= index < gpus:
                raise CapacityError(f"MIG layout names GPU {index}, but the node has {gpus}")
            if index in seen:
                raise CapacityError(f"MIG layout names GPU {index} twice")
            seen.add(index)
        if not group.get("mig-enabled", False):
            add(WHOLE_GPU, len(indices), 1)
            continue
        slices = {str(p): int(n) for p, n in (group.get("mig-devices") or {}).items()}
        if strategy == "mixed":
            for profile, count in slices.items():
                add(f"nvidia.com/mig-{profile}", count * len(indices), count)
        elif strategy == "single":
            if len(slices) != 1:
                raise CapacityError("MIG strategy single needs one profile per GPU")
            (count,) = slices.values()
            add(WHOLE_GPU, count * len(indices), count)
        # strategy none: MIG instances are not advertised at all.
    add(WHOLE_GPU, gpus - len(seen), 1)

    time_slicing = (plugin.get("sharing") or {}).get("timeSlicing") or {}
    rename_by_default = bool(time_slicing.get("renameByDefault", False))
    for resource in time_slicing.get("resources") or []:
        name = str(resource["name"])
        replicas = int(resource.get("replicas", 1))
        if name not in units or replicas < 1:
            continue
        per_node, per_gpu = units.pop(name)
        advertised = str(resource.get("rename") or (f"{name}.shared" if rename_by_default else name))
        add(advertised, per_node * replicas, per_gpu * replicas)
    return {name: Offer(name, n, g) for name, (n, g) in units.items()}


def read_pools(objects: Sequence[Obj]) -> list[Pool] | None:
    cm = _configmap(objects, PLAN_CONFIGMAP)
    if cm is None:
        return None
    plan = yaml.safe_load((cm.get("data") or {}).get(PLAN_KEY, "")) or {}
    pools = []
    for raw in plan.get("nodePools") or []:
        pool = Pool(
            name=str(raw["name"]),
            min_nodes=int(raw.get("minNodes", 0)),
            max_nodes=int(raw["maxNodes"]),
            gpus_per_node=int(raw["gpusPerNode"]),
            labels={str(k): str(v) for k, v in (raw.get("labels") or {}).items()},
            taints=[Taint.parse(str(t)) for t in raw.get("taints") or []],
        )
        if not 0 <= pool.min_nodes <= pool.max_nodes:
            raise CapacityError(f"pool {pool.name}: minNodes {pool.min_nodes} and maxNodes {pool.max_nodes}")
        plugin = _device_plugin_config(objects, raw.get("devicePluginConfig"))
        layout = _mig_layout(objects, str(raw["migConfig"])) if raw.get("migConfig") else None
        pool.offers = node_offers(pool.gpus_per_node, plugin, layout)
        pools.append(pool)
    return pools


# --- workloads ----------------------------------------------------------------------------------


@dataclass
class Workload:
    kind: str
    namespace: str
    name: str
    pods: int  # running or starting at once: the scaler's maximum plus a rollout's surge
    per_pod: dict[str, int]
    priority: int
    template: Obj
    terminating: int = 0  # stopping at the same time, still counted by the quota

    @property
    def counted(self) -> int:
        """Pods the namespace quota counts at once: a terminating pod holds its quota until it is gone."""
        return self.pods + self.terminating

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.kind}/{self.name}"

    @property
    def yields(self) -> bool:
        """A negative priority: it gives way to every other ragpod pod."""
        return self.priority < 0


def _gpu_units(resources: Mapping[str, Any] | None) -> dict[str, int]:
    resources = resources or {}
    merged: dict[str, int] = {}
    for part in ("requests", "limits"):  # extended resources: requests equal limits, either may be given
        for name, value in (resources.get(part) or {}).items():
            if str(name).startswith(GPU_PREFIX):
                merged[str(name)] = max(merged.get(str(name), 0), int(str(value)))
    return merged


def _add(into: dict[str, int], more: Mapping[str, int]) -> dict[str, int]:
    for name, value in more.items():
        into[name] = into.get(name, 0) + value
    return into


def pod_gpu_units(pod_spec: Mapping[str, Any]) -> dict[str, int]:
    """GPU units one pod holds: its containers and sidecars, or its largest init step if larger."""
    sidecars: dict[str, int] = {}
    init_peak: dict[str, int] = {}
    for init in pod_spec.get("initContainers") or []:
        units = _gpu_units(init.get("resources"))
        if init.get("restartPolicy") == "Always":
            _add(sidecars, units)
        else:
            for name, value in units.items():
                init_peak[name] = max(init_peak.get(name, 0), value + sidecars.get(name, 0))
    running = dict(sidecars)
    for container in pod_spec.get("containers") or []:
        _add(running, _gpu_units(container.get("resources")))
    return {name: max(running.get(name, 0), init_peak.get(name, 0)) for name in set(running) | set(init_peak)}


def _rolling(deployment: Obj, pods: int, name: str, default: str, round_up: bool) -> int:
    strategy = deployment["spec"].get("strategy") or {}
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        return 0
    value = (strategy.get("rollingUpdate") or {}).get(name, default)
    if isinstance(value, str) and value.endswith("%"):
        share = pods * int(value[:-1]) / 100
        return math.ceil(share) if round_up else math.floor(share)
    return int(value)


def _surge(deployment: Obj, pods: int) -> int:
    """Pods a rolling update may add above the replicas (maxSurge rounds up)."""
    return _rolling(deployment, pods, "maxSurge", "25%", round_up=True)


def _terminating(deployment: Obj, pods: int) -> int:
    """Pods of a Deployment that may be terminating while their replacements are created.

    The Deployment controller does not wait for a deleted pod to be gone: in a
    rollout it replaces up to maxUnavailable + maxSurge pods a step, and a pod
    evicted from a drained node (one at a time under the PodDisruptionBudget)
    is replaced at once. Each terminating pod still counts against the quota
    for up to its grace period, so a quota sized to the maximum refuses the
    replacement. At least one (an eviction happens with any strategy), none
    for a pod with no grace period.
    """
    grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    if int(grace) == 0:
        return 0  # deleted from the API at once: nothing is left to count
    if (deployment["spec"].get("strategy") or {}).get("type", "RollingUpdate") != "RollingUpdate":
        return 1
    unavailable = _rolling(deployment, pods, "maxUnavailable", "25%", round_up=False)
    return max(1, unavailable + _surge(deployment, pods))


def _job_terminating(job: Mapping[str, Any], parallelism: int) -> int:
    """A Job replaces a failed pod only once it is gone with podReplacementPolicy Failed
    (the default with a podFailurePolicy); else while it terminates."""
    policy = job.get("podReplacementPolicy") or ("Failed" if job.get("podFailurePolicy") else "TerminatingOrFailed")
    return 0 if policy == "Failed" else parallelism


def _scalers(objects: Sequence[Obj]) -> dict[tuple[str, str, str], list[tuple[str, int]]]:
    """(namespace, kind, name) of a scale target -> [(scaler, most replicas it sets)]."""
    found: dict[tuple[str, str, str], list[tuple[str, int]]] = defaultdict(list)
    for obj in objects:
        spec = obj.get("spec") or {}
        if obj.get("kind") == "HorizontalPodAutoscaler":
            ref = spec["scaleTargetRef"]
            found[(_namespace(obj), ref["kind"], ref["name"])].append((f"HPA {_name(obj)}", int(spec["maxReplicas"])))
        elif obj.get("kind") == "ScaledObject":
            ref = spec["scaleTargetRef"]
            most = int(spec.get("maxReplicaCount", 100))  # KEDA's default
            most = max(most, int((spec.get("fallback") or {}).get("replicas", 0)))
            key = (_namespace(obj), ref.get("kind", "Deployment"), ref["name"])
            found[key].append((f"ScaledObject {_name(obj)}", most))
    return found


def read_workloads(objects: Sequence[Obj]) -> tuple[list[Workload], list[str]]:
    priorities = {_name(o): int(o.get("value", 0)) for o in objects if o.get("kind") == "PriorityClass"}
    scalers = _scalers(objects)
    workloads, errors = [], []
    for obj in objects:
        kind = obj.get("kind")
        if kind not in WORKLOAD_KINDS:
            continue
        spec = obj["spec"]
        if kind == "CronJob":
            job = spec["jobTemplate"]["spec"]
            template = job["template"]
            policy = spec.get("concurrencyPolicy", "Allow")
            if policy == "Allow":
                errors.append(f"{_namespace(obj)}/CronJob/{_name(obj)}: concurrencyPolicy Allow lets Jobs pile up")
            pods = int(job.get("parallelism", 1)) * (2 if policy == "Replace" else 1)
            terminating = _job_terminating(job, int(job.get("parallelism", 1)))
        elif kind == "Job":
            template = spec["template"]
            pods = int(spec.get("parallelism", 1))
            terminating = _job_terminating(spec, pods)
        else:
            template = spec["template"]
            scaled = scalers.get((_namespace(obj), kind, _name(obj)), [])
            if len(scaled) > 1:
                errors.append(f"{_namespace(obj)}/{kind}/{_name(obj)}: scaled by {', '.join(s for s, _ in scaled)}")
            replicas = max((most for _, most in scaled), default=int(spec.get("replicas", 1)))
            pods = replicas
            # A StatefulSet recreates a pod only after the old one is gone.
            terminating = 0
            if kind == "Deployment":
                pods += _surge(obj, replicas)
                terminating = _terminating(obj, replicas)
        per_pod = pod_gpu_units(template["spec"])
        if not per_pod:
            continue
        class_name = template["spec"].get("priorityClassName")
        if class_name and class_name not in priorities:
            errors.append(f"{_namespace(obj)}/{kind}/{_name(obj)}: PriorityClass {class_name} is not in the render")
        priority = priorities.get(class_name, 0) if class_name else 0
        workloads.append(Workload(kind, _namespace(obj), _name(obj), pods, per_pod, priority, template, terminating))
    return workloads, errors


# --- matching pods to pools ---------------------------------------------------------------------


def admits(pool: Pool, template: Obj) -> bool:
    """Whether a pool's nodes may take a pod of this template (GPU resources aside)."""
    return node_admits(pool.labels, pool.taints, template["spec"])


# --- the check ----------------------------------------------------------------------------------


@dataclass
class Report:
    name: str
    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def text(self) -> str:
        verdict = "OK" if self.ok else f"FAIL ({len(self.errors)})"
        body = [f"{self.name}: {verdict}", *(f"  {line}" for line in self.lines)]
        body += [f"  ERROR {error}" for error in self.errors]
        return "\n".join(body)


def _quotas(objects: Sequence[Obj]) -> dict[str, dict[str, int]]:
    """namespace -> GPU resource -> the smallest hard requests.<resource> of its ResourceQuotas."""
    quotas: dict[str, dict[str, int]] = defaultdict(dict)
    for obj in objects:
        if obj.get("kind") != "ResourceQuota":
            continue
        for key, value in ((obj.get("spec") or {}).get("hard") or {}).items():
            resource = str(key).removeprefix("requests.")
            if resource.startswith(GPU_PREFIX):
                limit = int(str(value))
                current = quotas[_namespace(obj)].get(resource)
                quotas[_namespace(obj)][resource] = limit if current is None else min(current, limit)
    return quotas


def check(objects: Sequence[Obj], name: str = "render") -> Report:
    report = Report(name)
    try:
        pools = read_pools(objects)
        workloads, errors = read_workloads(objects)
    except (CapacityError, KeyError, TypeError, ValueError) as exc:
        report.errors.append(f"cannot read the render: {exc}")
        return report
    report.errors += errors
    if pools is None:
        if workloads:
            report.errors.append(f"GPU workloads but no capacity plan (ConfigMap {PLAN_CONFIGMAP})")
        pools = []

    for pool in pools:
        offers = ", ".join(
            f"{o.resource} {o.per_node}/node ({o.per_gpu} per GPU)" for o in sorted(pool.offers.values(), key=str)
        )
        report.lines.append(
            f"pool {pool.name}: {pool.min_nodes}..{pool.max_nodes} nodes x {pool.gpus_per_node} GPUs; {offers}"
        )

    eligible: dict[tuple[str, str], list[Pool]] = {}
    for workload in workloads:
        for resource, units in sorted(workload.per_pod.items()):
            fits = [p for p in pools if resource in p.offers and admits(p, workload.template)]
            eligible[(workload.ref, resource)] = fits
            where = ", ".join(p.name for p in fits) or "no pool"
            stopping = f" (+{workload.terminating} terminating)" if workload.terminating else ""
            report.lines.append(
                f"{workload.ref}: {workload.pods} pods{stopping} x {units} {resource} = {workload.counted * units}"
                f" (priority {workload.priority}; pools: {where})"
            )
            if not fits:
                report.errors.append(f"{workload.ref} needs {resource}, which no pool that admits it offers")

    # The namespace quota covers everything the namespace may hold at once,
    # pods still terminating included: quota is checked when a pod is created.
    quotas = _quotas(objects)
    demand: dict[tuple[str, str], int] = defaultdict(int)
    for workload in workloads:
        for resource, units in workload.per_pod.items():
            demand[(workload.namespace, resource)] += workload.counted * units
    for (namespace, resource), needed in sorted(demand.items()):
        hard = quotas.get(namespace, {}).get(resource)
        if hard is None:
            report.errors.append(f"{namespace}: {needed} {resource} with no ResourceQuota on requests.{resource}")
            continue
        report.lines.append(f"quota {namespace} requests.{resource}: {needed} needed of {hard}")
        if needed > hard:
            report.errors.append(f"{namespace}: the workloads may need {needed} {resource}, the quota allows {hard}")

    # The pools hold every group of workloads that run together (Hall's condition).
    # Terminating pods are left out here: a replacement that finds its GPU still
    # held waits Pending for the grace period, it is not refused.
    by_resource: dict[str, list[Workload]] = defaultdict(list)
    for workload in workloads:
        for resource in workload.per_pod:
            by_resource[resource].append(workload)
    for resource, group in sorted(by_resource.items()):
        together = [w for w in group if not w.yields]
        subsets: list[tuple[Workload, ...]] = [(w,) for w in group if w.yields]
        subsets += [s for r in range(1, len(together) + 1) for s in itertools.combinations(together, r)]
        for subset in subsets:
            needed = sum(w.pods * w.per_pod[resource] for w in subset)
            usable = {p.name: p for w in subset for p in eligible[(w.ref, resource)]}
            supply = sum(p.supply(resource) for p in usable.values())
            if usable and needed > supply:
                names = " + ".join(w.ref for w in subset)
                report.errors.append(
                    f"{names} may need {needed} {resource}; pools {', '.join(sorted(usable))} offer {supply}"
                    " at their maximum size"
                )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help="overlay directories, or - for a render on stdin")
    args = parser.parse_args(argv)
    targets = args.targets or [str(p) for p in overlays()]
    failed = 0
    for target in targets:
        try:
            if target == "-":
                report = check(load(sys.stdin.read()), "stdin")
            else:
                report = check(render(Path(target)), Path(target).name)
        except ManifestError as exc:
            report = Report(target, errors=[str(exc)])
        print(report.text())
        failed += not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
