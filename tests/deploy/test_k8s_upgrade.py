"""Upgrades apply: no field the API server refuses to change differs from a release's render.

``kubectl apply -k`` over a cluster deployed from an earlier release fails on
an object whose immutable fields changed (a PersistentVolumeClaim's spec, a
workload's selector, a StatefulSet's volumeClaimTemplates, a Service's
clusterIP, a Job's template). Such a change needs a new object name and an
operator note instead. Each overlay is rendered here and at every baseline
(the newest release tag, ``v*``, and the commit clusters were deployed from
before releases were tagged) and the immutable fields of the objects both
renders hold are compared.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from deploy.manifests import render
from tests.fixtures import k8s_manifests as k8s

# The manifests were first applied to clusters from this commit, before releases were tagged.
FIRST_DEPLOYED = "9a7cd41"

Obj = dict[str, Any]
Key = tuple[str, str, str]


def baselines() -> list[str]:
    """The newest release tag reachable from HEAD (when there is one) and the first deployed commit."""
    refs = [FIRST_DEPLOYED]
    found = subprocess.run(
        ["git", "describe", "--tags", "--abbrev=0", "--match", "v*", "HEAD"],
        cwd=k8s.REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode == 0:
        refs.insert(0, found.stdout.strip())
    return refs


def immutable_fields(obj: Obj) -> dict[str, Any]:
    """What the API server refuses to change on an existing object of this kind."""
    kind, spec = obj["kind"], obj.get("spec") or {}
    fields: dict[str, Any] = {}
    if kind == "PersistentVolumeClaim":
        # Only the storage request may grow (where the class allows expansion); the rest is fixed.
        fields["spec"] = {k: v for k, v in spec.items() if k != "resources"}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        fields["selector"] = spec.get("selector")
    if kind == "StatefulSet":
        fields["volumeClaimTemplates"] = [
            {"name": t["metadata"]["name"], "spec": {k: v for k, v in t["spec"].items() if k != "resources"}}
            for t in spec.get("volumeClaimTemplates") or []
        ]
        fields["serviceName"] = spec.get("serviceName")
        fields["podManagementPolicy"] = spec.get("podManagementPolicy", "OrderedReady")
    if kind == "Service":
        fields["clusterIP"] = spec.get("clusterIP")
    if kind == "Job":
        fields["template"] = spec.get("template")
    if kind in ("ConfigMap", "Secret") and obj.get("immutable"):
        fields["data"] = (obj.get("data"), obj.get("stringData"), obj.get("binaryData"))
    return fields


def by_key(objects: list[Obj]) -> dict[Key, Obj]:
    return {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objects}


def conflicts(old: list[Obj], new: list[Obj]) -> list[str]:
    """Objects in both renders whose immutable fields differ: ``kubectl apply`` would fail on each."""
    before = by_key(old)
    found = []
    for key, obj in by_key(new).items():
        if key in before:
            was, now = immutable_fields(before[key]), immutable_fields(obj)
            for field in sorted(set(was) | set(now)):
                if was.get(field) != now.get(field):
                    found.append(f"{'/'.join(key)}: {field}")
    return found


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """baseline ref -> a copy of its deploy/k8s tree."""
    trees = {}
    for ref in baselines():
        if subprocess.run(["git", "cat-file", "-e", f"{ref}^{{commit}}"], cwd=k8s.REPO, check=False).returncode:
            pytest.fail(f"{ref} is not in this clone: fetch the history and the tags (git fetch --tags --unshallow)")
        target = tmp_path_factory.mktemp(f"release-{ref.replace('/', '-')}")
        archive = subprocess.run(
            ["git", "archive", "--format=tar", ref, "deploy/k8s"], cwd=k8s.REPO, check=True, capture_output=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(target, filter="data")
        trees[ref] = target / "deploy" / "k8s"
    return trees


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_an_upgrade_from_each_release_changes_no_immutable_field(renders, released, overlay):
    checked = 0
    for ref, tree in released.items():
        path = tree / "overlays" / overlay
        if not path.is_dir():
            continue  # the overlay is new since that release: nothing to upgrade from
        assert conflicts(render(path), renders[overlay].objects) == [], f"apply over {ref} fails"
        checked += 1
    assert checked >= 1


def test_the_check_catches_a_changed_claim_and_selector(renders):
    """The check itself: the shape of the change that broke upgrades is found."""
    new = renders["gpu-cluster"].objects
    claim = next(o for o in new if o["kind"] == "PersistentVolumeClaim")
    deployment = next(o for o in new if o["kind"] == "Deployment")
    old_claim = {**claim, "spec": {**claim["spec"], "storageClassName": "standard"}}
    old_deployment = {**deployment, "spec": {**deployment["spec"], "selector": {"matchLabels": {"app": "x"}}}}
    old = [o for o in new if o is not claim and o is not deployment] + [old_claim, old_deployment]
    found = conflicts(old, new)
    assert any(f.startswith("PersistentVolumeClaim/") and f.endswith(": spec") for f in found)
    assert any(f.startswith("Deployment/") and f.endswith(": selector") for f in found)
    # Growing a claim is allowed.
    grown = {**claim, "spec": {**claim["spec"], "resources": {"requests": {"storage": "1Ti"}}}}
    assert conflicts([grown], [claim]) == []
