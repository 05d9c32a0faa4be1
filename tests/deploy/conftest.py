"""Fixtures of the manifest tests: every overlay rendered once per session."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.fixtures import k8s_manifests as k8s


@pytest.fixture(scope="session")
def renders() -> dict[str, k8s.Render]:
    """overlay name -> Render of its objects."""
    with ThreadPoolExecutor(max_workers=len(k8s.OVERLAYS)) as pool:
        objects = pool.map(lambda name: k8s.render(k8s.K8S / "overlays" / name), k8s.OVERLAYS)
        return {name: k8s.Render(name, found) for name, found in zip(k8s.OVERLAYS, objects, strict=True)}
