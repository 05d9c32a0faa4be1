"""Benchmark figures: each script records what it measured; this draws them.

    .venv/bin/python bench/plot.py            # draw every docs/benchmarks/<name>.json as <name>.png

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
"""

from __future__ import annotations

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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks"

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


def main() -> int:
    paths = [Path(arg) for arg in sys.argv[1:]] or sorted(OUT.glob("*.json"))
    for path in paths:
        png = draw(path)
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {png.name if png else 'no charts'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
