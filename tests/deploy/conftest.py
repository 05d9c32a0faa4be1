"""Fixtures of the manifest tests: every overlay rendered once per session."""

from __future__ import annotations

import importlib.util
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import pytest


def _load(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Loaded by path under names of their own (tests/ is not a package); the test
# modules then import them by these names.
_ROOT = Path(__file__).resolve().parents[2]
k8s = _load("ragpod_k8s_manifests", _ROOT / "tests" / "fixtures" / "k8s_manifests.py")
capacity = _load("ragpod_deploy_capacity", _ROOT / "deploy" / "capacity.py")


@pytest.fixture(scope="session")
def renders() -> dict[str, object]:
    """overlay name -> Render of its objects."""
    with ThreadPoolExecutor(max_workers=len(k8s.OVERLAYS)) as pool:
        objects = pool.map(lambda name: k8s.render(k8s.K8S / "overlays" / name), k8s.OVERLAYS)
        return {name: k8s.Render(name, found) for name, found in zip(k8s.OVERLAYS, objects, strict=True)}
