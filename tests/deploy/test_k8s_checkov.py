"""checkov on the rendered overlays: no failed check, and a written reason for every skipped one."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.fixtures import k8s_manifests as k8s

SKIP = re.compile(r"^CKV2?_K8S_\d+=[^=]{20,}$")


def test_checkov_reports_no_failed_check_on_any_overlay():
    done = subprocess.run(
        ["bash", str(k8s.K8S / "checkov.sh"), "--quiet", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.stdout.strip(), done.stderr[-2000:]
    report = json.loads(done.stdout)
    failed = [(c["check_id"], c["resource"], c["file_path"]) for c in report["results"]["failed_checks"]]
    assert failed == []
    summary = report["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["resource_count"] > 100 and summary["passed"] > 1000
    assert done.returncode == 0


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_every_skipped_checkov_check_carries_its_reason(renders, overlay):
    skips = []
    for obj in renders[overlay].objects:
        for key, value in (obj["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                skips.append(value)
                assert SKIP.match(value), f"{obj['kind']}/{obj['metadata']['name']}: {value}"
    assert skips
