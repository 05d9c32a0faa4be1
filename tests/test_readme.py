"""The README is a front door that tells the truth, and docs/configuration.md lists every setting."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _plot() -> ModuleType:
    """bench/plot.py, which writes docs/benchmarks.md and the README's table (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_plot", ROOT / "bench" / "plot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("service", ["gateway", "embedding", "retriever", "llm"])
def test_every_setting_is_in_the_configuration_page(service: str) -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    settings = importlib.import_module(f"services.{service}.config").Settings
    missing = [f"RAG_{name.upper()}" for name in settings.model_fields if f"`RAG_{name.upper()}`" not in page]
    assert missing == []


def test_the_readme_stays_a_front_door() -> None:
    # Later additions go to docs/.
    assert len(README.read_text().splitlines()) < 300


def test_the_readme_names_the_two_commands() -> None:
    readme = README.read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run", "test", "test-fast"):
        assert f"make {target}" in readme
        assert f"\n{target}:" in makefile


def _error_kinds() -> dict[str, str]:
    """Every error kind a class under services/ fixes (``error = "..."``), but the base's own default."""
    kinds: dict[str, str] = {}
    for path in (ROOT / "services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef) or node.name == "RagError":
                continue
            for statement in node.body:
                if (
                    isinstance(statement, ast.Assign)
                    and [getattr(t, "id", None) for t in statement.targets] == ["error"]
                    and isinstance(statement.value, ast.Constant)
                    and isinstance(statement.value.value, str)
                ):
                    kinds[statement.value.value] = f"{path.relative_to(ROOT)}:{node.name}"
    return kinds


def test_the_readme_lists_every_error_kind() -> None:
    table = README.read_text().split("### Errors", 1)[1].split("\n## ", 1)[0]
    kinds = _error_kinds()
    assert "validation_error" in kinds and "internal_error" in kinds
    missing = {kind: where for kind, where in kinds.items() if f"`{kind}`" not in table}
    assert missing == {}


def test_the_readme_shows_the_latest_benchmark_figures() -> None:
    plot = _plot()
    readme = README.read_text()
    assert plot.README_START in readme and plot.README_END in readme
    assert plot.readme_with_table(readme, plot.latest()) == readme, "run .venv/bin/python bench/plot.py"


def test_the_benchmark_page_is_written_from_the_latest_figures() -> None:
    plot = _plot()
    bodies = plot.latest()
    assert (ROOT / "docs" / "benchmarks.md").read_text() == plot.page(bodies), "run .venv/bin/python bench/plot.py"
    for body in bodies:
        # every figure with its date and machine
        assert body["date"] and body["machine"]["summary"]


def test_every_benchmark_goal_names_a_recorded_figure() -> None:
    plot = _plot()
    recorded: dict[str, set[str]] = {}
    for body in plot.latest():
        recorded.setdefault(plot._script(body), set()).update(body["figures"])
    for script, goals in plot.GOALS.items():
        assert (ROOT / "bench" / f"{script}.py").exists(), script
        assert {goal.figure for goal in goals} <= recorded.get(script, set()), script


def test_every_ragpod_command_in_the_readme_exists() -> None:
    from ragpod.cli import parser

    readme = README.read_text()
    used = set(re.findall(r"(?:bin/|`)ragpod (\w+)", readme))
    choices = next(a for a in parser()._actions if a.dest == "command").choices  # argparse keeps subcommands here
    assert choices is not None
    assert used and used <= set(choices), used - set(choices)
    for option in re.findall(r"ragpod run[^\n`]*?(--[\w-]+)", readme):
        assert option in parser().format_help() or option in choices["run"].format_help(), option


def test_every_path_in_the_layout_exists() -> None:
    readme = README.read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    paths = [line.split()[0] for line in block.splitlines() if line.strip()]
    missing = [p for p in paths if "<" not in p and not (ROOT / p).exists()]
    assert paths and missing == []


def test_every_link_in_the_readme_and_the_changelog_leads_somewhere() -> None:
    for name in ("README.md", "CHANGELOG.md", "docs/configuration.md"):
        path = ROOT / name
        links = re.findall(r"\]\(([^)#]+)\)", path.read_text())
        missing = [link for link in links if not link.startswith("http") and not (path.parent / link).exists()]
        assert missing == [], name
