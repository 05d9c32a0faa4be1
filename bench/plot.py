"""Benchmark figures: each script records what it measured; this draws them.

    .venv/bin/python bench/plot.py            # draw every docs/benchmarks/<name>.json as <name>.png
                                              # and write docs/benchmarks.md and the README's table

A benchmark script ends with one call (the script's folder is on ``sys.path``
when it runs as ``python bench/<name>.py``)::

    from plot import record
    record("queue_hop", figures={"throughput_ratio": 0.98, ...}, charts=[lines(...), bars(...)])

``record`` writes ``docs/benchmarks/<name>.json``: the date (UTC), the machine
(CPU model, cores, memory, GPU, Python, and the load average when the run
ended, because the machine may be shared), the figures of the ``RESULT`` line,
and the charts to draw. ``make bench`` runs every script, then this file.
Charts are plain data, so a figure can be redrawn without running anything:

- ``lines(title, x_label, y_label, {label: (xs, ys)})``: one line per label,
  e.g. throughput against concurrency;
- ``bars(title, y_label, groups, {label: values}, log=False)``: grouped bars,
  one group per entry of ``groups`` (e.g. latency percentiles per stage); a
  log scale where small stages sit beside a large one.

From the same files it writes ``docs/benchmarks.md`` (every benchmark's latest
figures, each with its date and machine, and its plot) and the table of the
figures that have a goal (``GOALS``) into README.md, between the two
``<!-- benchmarks ... -->`` markers. Nothing is measured again: the page and
the table change only when a benchmark has recorded a new run.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks"
PAGE = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
README_START = "<!-- benchmarks: written by bench/plot.py from docs/benchmarks/*.json; do not edit by hand -->"
README_END = "<!-- end of benchmarks -->"

Chart = dict[str, Any]


def lines(
    title: str, x_label: str, y_label: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]]
) -> Chart:
    return {
        "kind": "lines",
        "title": title,
        "x_label": x_label,
        "y_label": y_label,
        "lines": {label: {"x": list(xs), "y": list(ys)} for label, (xs, ys) in series.items()},
    }


def bars(
    title: str, y_label: str, groups: Sequence[str], series: Mapping[str, Sequence[float]], log: bool = False
) -> Chart:
    return {
        "kind": "bars",
        "title": title,
        "y_label": y_label,
        "groups": list(groups),
        "bars": {label: list(values) for label, values in series.items()},
        "log": log,
    }


def _first_line(path: str, prefix: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    memory_kb = _first_line("/proc/meminfo", "MemTotal")
    gpus = _gpus()
    cpu = _first_line("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    cores = os.cpu_count() or 0
    memory = f"{int(memory_kb.split()[0]) / 2**20:.0f} GiB" if memory_kb else "unknown"
    return {
        "cpu": cpu,
        "cores": cores,
        "memory": memory,
        "gpus": gpus,
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "summary": f"{cores} CPU cores ({cpu}), {memory}, " + (", ".join(gpus) if gpus else "no GPU"),
    }


def record(
    name: str,
    figures: Mapping[str, Any],
    charts: Sequence[Chart] = (),
    note: str = "",
    out: Path = OUT,
) -> Path:
    """Writes ``<out>/<name>.json`` (date, machine, figures, charts, note) and returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    body = {
        "name": name,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "command": " ".join([Path(sys.argv[0]).as_posix().removeprefix(str(ROOT) + "/"), *sys.argv[1:]]),
        "figures": dict(figures),
        "charts": list(charts),
        "note": note,
    }
    path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    return path


# --- drawing ------------------------------------------------------------------------------------------------


def _draw_lines(ax: Any, chart: Chart) -> None:
    for label, line in chart["lines"].items():
        ax.plot(line["x"], line["y"], marker="o", label=label)
    xs = sorted({x for line in chart["lines"].values() for x in line["x"]})
    if xs and all(x > 0 for x in xs) and xs[-1] / xs[0] >= 8:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel(chart["x_label"])
    ax.set_ylabel(chart["y_label"])
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _label(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _draw_bars(ax: Any, chart: Chart) -> None:
    groups = chart["groups"]
    series = chart["bars"]
    width = 0.8 / max(len(series), 1)
    for index, (label, values) in enumerate(series.items()):
        positions = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        drawn = ax.bar(positions, values, width, label=label)
        ax.bar_label(drawn, labels=[_label(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    if chart.get("log"):
        ax.set_yscale("log")
    ax.set_ylabel(chart["y_label"])
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def draw(json_path: Path) -> Path | None:
    """Draws one recorded benchmark as a PNG beside its JSON (nothing when it has no charts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    body = json.loads(json_path.read_text(encoding="utf-8"))
    charts = body.get("charts") or []
    if not charts:
        return None
    columns = min(len(charts), 2)
    rows = -(-len(charts) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.4 * columns, 4.4 * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(charts) :]:
        ax.set_visible(False)
    for ax, chart in zip(axes.flat, charts, strict=False):
        (_draw_lines if chart["kind"] == "lines" else _draw_bars)(ax, chart)
        ax.set_title(chart["title"], fontsize=10)
    machine = body["machine"]
    load = machine.get("load_average_1m")
    lines_below = [
        *textwrap.wrap(body.get("note") or "", width=int(17 * 6.4 * columns)),
        f"{body['name']}  ·  {body['date']}" + (f"  ·  load average {load} when it ended" if load is not None else ""),
        machine["summary"],
    ]
    for row, text in enumerate(reversed(lines_below)):
        fig.text(0.01, (0.06 + row * 0.14) / fig.get_figheight(), text, fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, (0.1 + 0.14 * len(lines_below)) / fig.get_figheight(), 1, 1))
    png = json_path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# --- the page and the README's table ---------------------------------------------------------------------


_SIGNS = {">=": "≥", "<=": "≤", "==": "="}


class Goal(NamedTuple):
    figure: str
    op: str  # ">=", "<=" or "=="
    value: float
    meaning: str

    def met(self, latest: float) -> bool:
        if self.op == ">=":
            return latest >= self.value
        if self.op == "<=":
            return latest <= self.value
        return latest == self.value

    def text(self) -> str:
        return f"{_SIGNS[self.op]} {self.value:g}"


GOALS: dict[str, tuple[Goal, ...]] = {
    # The goals each script's docstring states, keyed by script; a figure without a goal is not in the table.
    "ask": (Goal("overhead_p50_ms", "<=", 15, "ms the four services add to one question at p50"),),
    "embedding": (Goal("ratio", ">=", 0.9, "texts/s through HTTP over the raw model's, 32 clients"),),
    "retriever": (Goal("p99_ms", "<=", 20, "ms of `/v1/search` at p99, query embedding included"),),
    "retrieval_quality": (
        Goal("recall_at_1", ">=", 0.9, "the right document first"),
        Goal("recall_at_5", ">=", 1.0, "the right document in the first five"),
    ),
    "answer_quality": (
        Goal("heldout_fact_in_answer", ">=", 0.8, "held-out covered questions answered with their fact"),
        Goal("heldout_refused_uncovered", ">=", 0.9, "held-out uncovered questions refused (before or after a job)"),
        Goal("heldout_refused_covered", "==", 0, "held-out covered questions refused"),
        Goal("heldout_grounded_precision", ">=", 0.9, "held-out answers marked grounded that are right"),
        Goal("heldout_looping", "==", 0, "held-out answers that loop"),
    ),
    "ingest": (Goal("ratio", ">=", 0.8, "chunks/s through `POST /v1/documents` over the model alone"),),
    "queue_hop": (
        Goal("throughput_ratio", ">=", 0.95, "jobs/s through the Redis queue over direct calls"),
        Goal("hop_p50_ms", "<=", 2, "ms the queue adds to one job at p50"),
    ),
    "overload": (
        Goal("goodput_ratio", ">=", 0.95, "answers/s at three times capacity over capacity"),
        Goal("p99_ratio", "<=", 2, "p99 latency then over p99 at capacity"),
        Goal("lost", "==", 0, "requests with neither an answer nor an error"),
    ),
}


def _script(body: Mapping[str, Any]) -> str:
    """The benchmark script a recorded run came from (``embedding-cuda`` is a run of ``embedding``)."""
    command = str(body.get("command") or "").split()
    return Path(command[0]).stem if command else str(body["name"])


def _machine_short(machine: Mapping[str, Any]) -> str:
    gpus = [str(gpu).split(",")[0] for gpu in machine.get("gpus") or []]
    gpu = f"{len(gpus)}x {gpus[0]}" if len(gpus) > 1 else (gpus[0] if gpus else "no GPU")
    return f"{machine.get('cores', '?')} CPU cores, {gpu}"


def _measured(body: Mapping[str, Any]) -> str:
    """When and on what: the day, the machine, and the device where a GPU machine ran a CPU benchmark."""
    machine = body["machine"]
    on_cpu = machine.get("gpus") and body["figures"].get("device") == "cpu"
    return f"{body['date'][:10]}, {_machine_short(machine)}" + (" (run on the CPU)" if on_cpu else "")


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return json.dumps(value, separators=(", ", ": "))
    return f"{value:g}"


def latest(out: Path = OUT) -> list[dict[str, Any]]:
    """Every recorded benchmark, in the order of ``GOALS`` (then the others by name)."""
    bodies = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(out.glob("*.json"))]
    order = {script: index for index, script in enumerate(GOALS)}
    return sorted(bodies, key=lambda body: (order.get(_script(body), len(order)), body["name"]))


def goals_table(bodies: Sequence[Mapping[str, Any]]) -> str:
    """One row per figure with a goal: the latest value, the goal, and when and where it was measured."""
    rows = [
        "| benchmark | figure | latest | goal | met | measured |",
        "|---|---|---|---|---|---|",
    ]
    for body in bodies:
        for goal in GOALS.get(_script(body), ()):
            value = body["figures"].get(goal.figure)
            if not isinstance(value, int | float):
                continue
            rows.append(
                f"| {body['name']} | `{goal.figure}`: {goal.meaning} | {_value(value)} | {goal.text()} "
                f"| {'yes' if goal.met(value) else 'no'} | {_measured(body)} |"
            )
    return "\n".join(rows) + "\n"


def _summary(script: str) -> str:
    """The first line of the benchmark script's docstring."""
    path = Path(__file__).resolve().parent / f"{script}.py"
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError):
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def page(bodies: Sequence[Mapping[str, Any]]) -> str:
    """``docs/benchmarks.md``: the goals table, then every benchmark's latest figures with date, machine and plot."""
    parts = [
        "# Benchmark figures\n",
        "Written by `bench/plot.py` from the latest `docs/benchmarks/<name>.json` of each benchmark (`make bench`"
        " runs every script in `bench/`, then `bench/plot.py`); do not edit it by hand. Every benchmark measures"
        " against a baseline in the same run; its script's docstring says how, and what each figure means."
        " Earlier runs are in git's history of `docs/benchmarks/`.\n",
        "## Against their goals\n",
        goals_table(bodies),
    ]
    for body in bodies:
        machine = body["machine"]
        load = machine.get("load_average_1m")
        summary = _summary(_script(body))
        parts.append(f"## {body['name']}\n")
        if summary:
            parts.append(f"`bench/{_script(body)}.py`: {summary}\n")
        parts.append(
            f"Measured {body['date']} on {machine['summary']}"
            + (f", load average {load} when it ended" if load is not None else "")
            + (f"; `{body['command']}`" if body.get("command") else "")
            + ".\n"
        )
        if body.get("note"):
            parts.append(f"{body['note']}\n")
        goals = {goal.figure: goal for goal in GOALS.get(_script(body), ())}
        rows = ["| figure | value | goal |", "|---|---|---|"]
        for figure, value in body["figures"].items():
            goal = goals.get(figure)
            rows.append(f"| `{figure}` | {_value(value)} | {goal.text() if goal else ''} |")
        parts.append("\n".join(rows) + "\n")
        if body.get("charts"):
            parts.append(f"![{body['name']}](benchmarks/{body['name']}.png)\n")
    return "\n".join(parts)


def readme_with_table(readme: str, bodies: Sequence[Mapping[str, Any]]) -> str:
    """The README with the goals table between its markers replaced (unchanged without the markers)."""
    if README_START not in readme or README_END not in readme:
        return readme
    before, rest = readme.split(README_START, 1)
    _, after = rest.split(README_END, 1)
    return f"{before}{README_START}\n{goals_table(bodies)}{README_END}{after}"


def write_pages(out: Path = OUT, page_path: Path = PAGE, readme_path: Path = README) -> None:
    bodies = latest(out)
    page_path.write_text(page(bodies), encoding="utf-8")
    if readme_path.exists():
        readme = readme_path.read_text(encoding="utf-8")
        updated = readme_with_table(readme, bodies)
        if updated != readme:
            readme_path.write_text(updated, encoding="utf-8")


def main() -> int:
    paths = [Path(arg) for arg in sys.argv[1:]] or sorted(OUT.glob("*.json"))
    for path in paths:
        png = draw(path)
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {png.name if png else 'no charts'}")
    write_pages()
    print(f"{PAGE.relative_to(ROOT)}, the table in {README.relative_to(ROOT)}: written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
