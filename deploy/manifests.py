"""Reading kustomize output the way the API server and the scheduler read it.

Shared by the capacity check (``python -m deploy.capacity``) and the manifest
tests (``tests/deploy``): rendering an overlay with ``kubectl kustomize``,
label selectors, node selector requirements, taints and tolerations, and
Kubernetes quantities. Written once so that the check and the tests cannot
disagree about what a selector matches.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

K8S_DIR = Path(__file__).resolve().parent / "k8s"
OVERLAYS_DIR = K8S_DIR / "overlays"
BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")

Obj = dict[str, Any]


class ManifestError(Exception):
    """The manifests cannot be rendered or read."""


# --- rendering ----------------------------------------------------------------------------------


def render(path: Path) -> list[Obj]:
    """The objects ``kubectl kustomize`` renders for a kustomization directory (``KUBECTL`` names the binary)."""
    kubectl = os.environ.get("KUBECTL", "kubectl")
    try:
        done = subprocess.run(
            [kubectl, "kustomize", str(path)], check=False, capture_output=True, text=True, timeout=120
        )
    except FileNotFoundError as exc:
        raise ManifestError(f"{kubectl} not found: kubectl renders the overlays (set KUBECTL)") from exc
    if done.returncode != 0:
        raise ManifestError(f"kubectl kustomize {path} failed: {done.stderr.strip()}")
    return load(done.stdout)


def load(text: str) -> list[Obj]:
    """The objects of a multi-document YAML stream, empty documents left out."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def overlays(root: Path = OVERLAYS_DIR) -> list[Path]:
    """Every overlay directory (one with a kustomization.yaml) under ``root``."""
    return sorted(p for p in root.iterdir() if (p / "kustomization.yaml").is_file())


def pod_template(workload: Mapping[str, Any]) -> Obj:
    """The pod template of a Deployment, StatefulSet, DaemonSet, Job or CronJob."""
    if workload["kind"] == "CronJob":
        return dict(workload["spec"]["jobTemplate"]["spec"]["template"])
    return dict(workload["spec"]["template"])


def all_containers(pod_spec: Mapping[str, Any]) -> list[Obj]:
    """Init containers (sidecars included) and containers of a pod spec."""
    return list(pod_spec.get("initContainers") or []) + list(pod_spec.get("containers") or [])


# --- selectors ----------------------------------------------------------------------------------


def requirement_holds(expression: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """One ``matchExpressions`` entry against a label set.

    In, NotIn, Exists and DoesNotExist are the operators of a label selector;
    Gt and Lt (integer comparison) exist only in node selector requirements.
    """
    key, operator = str(expression["key"]), expression["operator"]
    values = [str(v) for v in expression.get("values") or []]
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    if operator in ("Gt", "Lt"):
        if key not in labels:
            return False
        left, right = int(labels[key]), int(values[0])
        return left > right if operator == "Gt" else left < right
    raise ManifestError(f"unknown selector operator {operator}")


def label_selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector against a label set: an empty selector matches everything, none matches nothing."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(str(key)) != str(value):
            return False
    return all(requirement_holds(e, labels) for e in selector.get("matchExpressions") or [])


def node_selector_terms_match(terms: Sequence[Mapping[str, Any]], labels: Mapping[str, str]) -> bool:
    """Required node affinity: the terms are ORed, the expressions of a term ANDed."""
    return any(all(requirement_holds(e, labels) for e in term.get("matchExpressions") or []) for term in terms)


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str

    @classmethod
    def parse(cls, text: str) -> Taint:
        """``key=value:Effect`` or ``key:Effect``, as ``kubectl taint`` writes them."""
        spec, sep, effect = text.rpartition(":")
        if not sep or not spec:
            raise ManifestError(f"taint {text!r} is not key[=value]:Effect")
        key, _, value = spec.partition("=")
        return cls(key, value, effect)


def tolerates(tolerations: Sequence[Mapping[str, Any]], taint: Taint) -> bool:
    """Whether any toleration of a pod tolerates one taint."""
    for toleration in tolerations:
        effect = toleration.get("effect")
        if effect and effect != taint.effect:
            continue
        operator = toleration.get("operator", "Equal")
        key = toleration.get("key")
        if not key:
            if operator == "Exists":
                return True
            continue
        if key != taint.key:
            continue
        if operator == "Exists" or str(toleration.get("value", "")) == taint.value:
            return True
    return False


def node_admits(labels: Mapping[str, str], taints: Sequence[Taint], pod_spec: Mapping[str, Any]) -> bool:
    """Whether a node with these labels and taints may take a pod (resources aside).

    nodeSelector, required node affinity, and the taints that keep pods off
    (NoSchedule, NoExecute) against the pod's tolerations.
    """
    for key, value in (pod_spec.get("nodeSelector") or {}).items():
        if labels.get(str(key)) != str(value):
            return False
    required = ((pod_spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    if required and not node_selector_terms_match(required.get("nodeSelectorTerms") or [], labels):
        return False
    tolerations = pod_spec.get("tolerations") or []
    return all(tolerates(tolerations, t) for t in taints if t.effect in BLOCKING_EFFECTS)


# --- quantities ---------------------------------------------------------------------------------

_SUFFIXES = {
    "m": 0.001,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: object) -> float:
    """A Kubernetes quantity ("500m", "2", "16Gi") as a number."""
    text = str(value)
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return float(text)


def resources(container: Mapping[str, Any], part: str) -> dict[str, float]:
    """``requests`` or ``limits`` of a container as numbers."""
    return {str(k): quantity(v) for k, v in ((container.get("resources") or {}).get(part) or {}).items()}
