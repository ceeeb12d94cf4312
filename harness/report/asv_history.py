"""asv history: read asv's result files and draw throughput and failure rate over commits.

asv keeps one JSON file per (machine, commit, environment) under ``results/asv/<machine>/`` and the
benchmark list in ``results/asv/benchmarks.json``. :func:`load_results` reads them (the asv gate in
``tools/asv_gate.py`` uses it too); :func:`history_svg` returns an inline SVG, for the HTML report, of
GEMM throughput and quick-matrix failure rate per strategy over commits, one row per machine, because
asv's own published page needs network access to display.

>>> svg = history_svg("results/asv")            # doctest: +SKIP
>>> svg.startswith("<svg")                      # doctest: +SKIP
True
"""
from __future__ import annotations

import ast
import io
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..results import InputError

__all__ = ["AsvResult", "read_result_file", "load_results", "benchmark_info", "history_svg", "THROUGHPUT",
           "FAILURE_RATE", "param_label"]

#: The benchmarks the history plot draws (names as asv gives them, relative to suites/benchmarks).
THROUGHPUT = "bench_ops.Gemm.track_tflops"
FAILURE_RATE = "bench_matrix.FailureRate.track_failure_rate"
def _unquote(p: str) -> str:
    """asv stores parameter values as their repr (``"'fp16'"``); give back the plain text."""
    try:
        v = ast.literal_eval(p)
    except (ValueError, SyntaxError):
        return p
    return v if isinstance(v, str) else p


def param_label(key: tuple[str, ...]) -> str:
    """``("reduction", "fp16")`` -> ``"reduction, fp16"``; the empty key (no parameters) -> ``""``."""
    return ", ".join(key)


@dataclass(frozen=True)
class AsvResult:
    """One asv result file: a machine, a commit, and every benchmark's values by parameter tuple.

    ``values[name][key]`` is a float, NaN for a skipped combination, or None where it failed;
    ``versions[name]`` is the benchmark's version string when it ran."""

    path: Path
    machine: str
    commit: str
    date: int
    params: dict[str, Any]
    env_name: str
    values: dict[str, dict[tuple[str, ...], float | None]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def short(self) -> str:
        return self.commit[:8]


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def read_result_file(path: Path | str) -> AsvResult:
    """Parse one asv (0.6, format 2) result file; ``ValueError`` with a one-line reason if it is not one."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except OSError as exc:
        raise InputError(f"{p}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(d, dict) or "results" not in d or "commit_hash" not in d:
        raise InputError(f"{p}: not an asv result file (no commit_hash/results); pass a file from results/asv/<machine>/")
    if d.get("version") != 2:
        raise InputError(f"{p}: asv result format {d.get('version')}, this reads format 2 (asv 0.6)")
    cols = d.get("result_columns") or ["result", "params", "version"]
    values: dict[str, dict[tuple[str, ...], float | None]] = {}
    versions: dict[str, str] = {}
    for name, row in d["results"].items():
        entry = dict(zip(cols, row))
        result, grid = entry.get("result"), entry.get("params") or []
        keys = [tuple(_unquote(x) for x in combo) for combo in itertools.product(*grid)]
        if not isinstance(result, list):
            result = [result] * len(keys)
        values[name] = {k: _num(v) for k, v in zip(keys, result)}
        if entry.get("version") is not None:
            versions[name] = str(entry["version"])
    params = d.get("params") or {}
    return AsvResult(p, str(params.get("machine", p.parent.name)), d["commit_hash"], int(d.get("date") or 0),
                     params, str(d.get("env_name", "")), values, versions)


def load_results(results_dir: Path | str) -> list[AsvResult]:
    """Every result file under ``results_dir`` (``<machine>/<commit>-<env>.json``), oldest commit first."""
    root = Path(results_dir)
    if not root.is_dir():
        raise InputError(f"{root}: no such directory; record asv results first (docs/asv.md)")
    out = [read_result_file(f) for machine in sorted(root.iterdir()) if (machine / "machine.json").is_file()
           for f in sorted(machine.glob("*.json")) if f.name != "machine.json"]
    if not out:
        raise InputError(f"{root}: no asv result files (expected <machine>/<commit>-<env>.json); "
                         "record some with tools/asv_history.sh")
    return sorted(out, key=lambda r: (r.machine, r.date, r.commit))


def benchmark_info(results_dir: Path | str) -> dict[str, dict[str, Any]]:
    """asv's ``benchmarks.json`` (name -> unit, version, params...), or {} when there is none."""
    path = Path(results_dir) / "benchmarks.json"
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable ({exc}); re-run asv to rewrite it") from None
    return {k: v for k, v in d.items() if isinstance(v, dict)}


def _series(results: list[AsvResult], name: str, version: str | None
            ) -> tuple[list[str], dict[str, list[float]]]:
    """(commit labels in order, values per parameter label aligned with them, NaN where missing)."""
    by_commit: dict[str, AsvResult] = {}
    for r in results:  # oldest first: a later file for the same commit wins
        if name in r.values and (version is None or r.versions.get(name) == version):
            by_commit[r.commit] = r
    commits = list(by_commit.values())
    lines: dict[str, list[float]] = {}
    for i, r in enumerate(commits):
        for key, v in r.values[name].items():
            line = lines.setdefault(param_label(key), [math.nan] * len(commits))
            line[i] = math.nan if v is None else v
    return [r.short for r in commits], lines


def _title(results: list[AsvResult]) -> str:
    p = results[-1].params
    bits = [f"{k} {p[k]}" for k in ("gpu", "torch", "cuda") if p.get(k) not in (None, "", "none")]
    return " · ".join([results[-1].machine, *bits])


_MARKERS = ("o", "s", "^", "D")


def _colors(idx: range) -> list:
    from matplotlib import colormaps
    return [colormaps["tab20"](i) for i in idx]


def _panel(ax: Any, labels: list[str], lines: dict[str, list[float]], ylabel: str, log: bool) -> None:
    if not labels or all(all(math.isnan(v) for v in vals) for vals in lines.values()):
        ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(ylabel)
        return
    x = list(range(len(labels)))
    colors = _colors(range(20))
    for i, (label, vals) in enumerate(sorted(lines.items())):  # 13 presets: 20 colours, 4 markers
        ax.plot(x, vals, marker=_MARKERS[i % len(_MARKERS)], markersize=4, linewidth=1.2, label=label,
                color=colors[i % 20])
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7, family="monospace")
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_ylabel(ylabel)
    if log and all(v > 0 for vals in lines.values() for v in vals if not math.isnan(v)):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def history_svg(results_dir: Path | str) -> str:
    """An inline ``<svg>`` of GEMM throughput (TFLOP/s, log scale) and quick-matrix failure rate (%) per
    strategy over commits, one row per machine. Pure: reads the asv files, writes nothing; the same files
    give the same SVG. Only results of the benchmarks' current version (``benchmarks.json``) are drawn.
    Raises ``ValueError`` with a one-line reason when there is nothing to read."""
    from matplotlib import rc_context
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    results = load_results(results_dir)
    info = benchmark_info(results_dir)
    machines: dict[str, list[AsvResult]] = {}
    for r in results:
        machines.setdefault(r.machine, []).append(r)
    with rc_context({"svg.hashsalt": "mp-harness", "svg.fonttype": "none", "font.size": 8}):
        fig = Figure(figsize=(12, 3.4 * len(machines)), layout="constrained")
        FigureCanvasSVG(fig)
        axes = fig.subplots(len(machines), 2, squeeze=False)
        for row, (machine, rs) in zip(axes, machines.items()):
            for ax, name, ylabel, log in ((row[0], THROUGHPUT, "GEMM TFLOP/s", True),
                                          (row[1], FAILURE_RATE, "failure rate, quick tier (%)", False)):
                labels, lines = _series(rs, name, info.get(name, {}).get("version"))
                _panel(ax, labels, lines, ylabel, log)
            row[0].set_title(_title(rs), loc="left", fontsize=9)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]
