"""Plots of gradients and loss scaling as inline SVG: the gradient-magnitude histogram against the
formats' representable ranges, dynamic scalers' scale trajectories, and per-layer loss-scale windows.

The histogram is the picture that motivates loss scaling: FP16 flushes everything left of its smallest
subnormal and loses bits in its subnormal range, so gradients that live there must be scaled up, but
no further than the largest gradient allows. Records carry it (``window.log2_hist``, counts per binade
of the FP32 reference's gradients, with the formats' ranges); each case is drawn once.
"""
from __future__ import annotations

import math
import textwrap
from typing import Any

from ..results import case_seed_key, num
from .plots import figure

__all__ = ["grad_histogram_svg", "scale_trajectories_svg", "windows_svg"]

MAX_PANELS = 8
MAX_LINES = 8
MAX_ROWS = 40
ZONES = {"underflow": "#d62728", "subnormal": "#ff9f1c", "normal": "#5aa02c", "overflow": "#d62728"}


def _by_case(records: list[dict[str, Any]], has: Any) -> dict[str, dict[str, Any]]:
    """One record per case (the reference's window is the same for every strategy), in run order."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        cid = case_seed_key(r)
        if cid not in out and has(r):
            out[cid] = r
    return out


def _group(items: dict[str, dict[str, Any]]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for cid, r in items.items():
        groups.setdefault(r["scenario"], []).append((cid, r))
    return dict(list(groups.items())[:MAX_PANELS])


def _label(cid: str, scenario: str) -> str:
    """``[log2_grad=-28]#0`` for a case of ``grad_magnitude_sweep``: the panel names the scenario."""
    return cid[len(scenario):] or cid


def grad_histogram_svg(records: list[dict[str, Any]]) -> str | None:
    """Share of gradient entries per binade, one panel per scenario, FP16's zones shaded, and a strip
    per format showing where it underflows, is subnormal, normal, and overflows."""
    cases = _by_case(records, lambda r: (r.get("window") or {}).get("log2_hist", {}).get("counts"))
    if not cases:
        return None
    groups = _group(cases)
    first = next(iter(cases.values()))["window"]["log2_hist"]
    ranges = {f: {k: math.log2(v) for k, v in d.items()} for f, d in first["formats"].items()}
    los = [r["window"]["log2_hist"]["lo"] for r in cases.values()]
    his = [r["window"]["log2_hist"]["lo"] + len(r["window"]["log2_hist"]["counts"]) for r in cases.values()]
    fp16 = ranges["fp16"]  # reference.log2_histogram writes every format's range into every record
    x0, x1 = min(min(los), fp16["smallest"]) - 4, max(max(his), fp16["max"]) + 4
    out: list[str] = []
    n = len(groups)
    with figure("gradhist", 10.0, 1.9 * n + 0.5 + 0.25 * len(ranges), out) as fig:
        axes = fig.subplots(n + 1, 1, sharex=True, height_ratios=[4] * n + [0.45 * len(ranges) + 0.3])
        for ax, (scenario, items) in zip(axes[:-1], groups.items()):
            ax.axvspan(x0, fp16["smallest"], color=ZONES["underflow"], alpha=0.12, lw=0)
            ax.axvspan(fp16["smallest"], fp16["min_normal"], color=ZONES["subnormal"], alpha=0.15, lw=0)
            ax.axvspan(fp16["max"], x1, color=ZONES["overflow"], alpha=0.12, lw=0)
            for cid, r in items[:MAX_LINES]:
                h = r["window"]["log2_hist"]
                total = sum(h["counts"]) or 1
                xs = [h["lo"] + i for i in range(len(h["counts"]) + 1)]
                ys = [100 * c / total for c in h["counts"]]
                ax.stairs(ys, xs, label=_label(cid, scenario), lw=1.4)
            ax.set_title(f"{scenario}: FP32 reference gradients", fontsize=9, loc="left")
            ax.set_ylabel("% of entries")
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        _range_strip(axes[-1], ranges, x0, x1)
        axes[-1].set_xlabel("log2 |gradient| (binade); shaded: FP16 flushes to zero (red), keeps few bits "
                            "(orange), overflows (red)")
        axes[-1].set_xlim(x0, x1)
    return out[0]


def _range_strip(ax: Any, ranges: dict[str, dict[str, float]], x0: float, x1: float) -> None:
    ax.grid(False)
    for i, (fmt, r) in enumerate(ranges.items()):
        segs = [("underflow", x0, r["smallest"]), ("subnormal", r["smallest"], r["min_normal"]),
                ("normal", r["min_normal"], r["max"]), ("overflow", r["max"], x1)]
        for zone, a, b in segs:
            a, b = max(a, x0), min(b, x1)
            if b > a:
                ax.broken_barh([(a, b - a)], (i - 0.4, 0.8), color=ZONES[zone], alpha=0.55 if zone != "normal" else 0.4)
        for edge in (r["smallest"], r["max"]):
            if x0 < edge < x1:
                ax.text(edge, i, f" 2^{edge:.0f}" if edge == round(edge) else f" {2 ** edge:.3g}", va="center",
                        fontsize=6)
    ax.set_yticks(range(len(ranges)), list(ranges))
    ax.set_ylim(len(ranges) - 0.5, -0.5)


def _trajectory(r: dict[str, Any]) -> list[float]:
    sc = (r.get("metrics") or {}).get("scaler") or {}
    return [num(x) for x in sc.get("trajectory") or []]


def scale_trajectories_svg(records: list[dict[str, Any]]) -> str | None:
    """log2 of the loss scale per step for every dynamic scaler, one panel per scenario; strategies whose
    trajectories are identical share a line."""
    recs = [r for r in records if len(set(_trajectory(r))) > 1]
    if not recs:
        return None
    groups: dict[str, dict[tuple, list[str]]] = {}
    strides: dict[tuple, int] = {}
    for r in recs:
        key = (r.get("case"), tuple(_trajectory(r)))
        groups.setdefault(r["scenario"], {}).setdefault(key, []).append(r["strategy"])
        strides[key] = int(r["metrics"]["scaler"].get("trajectory_stride") or 1)
    groups = dict(list(groups.items())[:MAX_PANELS])
    out: list[str] = []
    with figure("traj", 10.0, 2.2 * len(groups) + 0.4, out) as fig:
        axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
        for ax, (scenario, lines) in zip(axes, groups.items()):
            for (cid, traj), strategies in list(lines.items())[:MAX_LINES]:
                st = strides[(cid, traj)]
                ys = [math.log2(s) if 0 < s < math.inf else math.nan for s in traj]
                ax.step([i * st for i in range(len(ys))], ys, where="post", lw=1.3,
                        label=f"{_label(str(cid), scenario)} {', '.join(strategies)}")
            ax.set_title(f"{scenario}: loss scale per step", fontsize=9, loc="left")
            ax.set_ylabel("log2 scale")
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        axes[-1].set_xlabel("training step")
    return out[0]


def _log2(x: float, lo: float, hi: float) -> float:
    return lo if x <= 0 else (hi if not x < math.inf else min(max(math.log2(x), lo), hi))


def windows_svg(records: list[dict[str, Any]]) -> str | None:
    """Per-tensor FP16 loss-scale windows [S_lo, S_hi] as bars (red where empty: no scale works for that
    tensor); models (several tensors) get a panel each, single-tensor cases share one panel."""
    cases = _by_case(records, lambda r: (r.get("window") or {}).get("per_tensor"))
    if not cases:
        return None
    panels: list[tuple[str, list[tuple[str, dict]], dict | None]] = []
    singles = []
    for cid, r in cases.items():
        per = r["window"]["per_tensor"]
        if len(per) > 1:
            panels.append((cid, list(per.items())[:MAX_ROWS], r["window"]))
        else:
            singles += [(cid, w) for w in per.values()]
    panels = panels[:MAX_PANELS]
    if singles:
        panels.append(("single-tensor cases", singles[:MAX_ROWS], None))
    vals = [v for _, rows, _ in panels for _, w in rows for v in (w["lo"], w["hi"]) if 0 < num(v) < math.inf]
    lo, hi = (math.log2(min(vals)) - 4, math.log2(max(vals)) + 4) if vals else (-40.0, 40.0)
    out: list[str] = []
    height = sum(0.8 + 0.22 * len(rows) for _, rows, _ in panels)
    with figure("windows", 8.0, height, out) as fig:
        axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=[1 + len(r) for _, r, _ in panels])[:, 0]
        for ax, (title, rows, whole) in zip(axes, panels):
            for i, (name, w) in enumerate(rows):
                a, b = _log2(num(w["lo"]), lo, hi), _log2(num(w["hi"]), lo, hi)
                empty = not num(w["lo"]) <= num(w["hi"])  # NaN compares false: an unknown window is no window
                ax.barh(i, abs(b - a), left=min(a, b), height=0.6, color="#d62728" if empty else "#5aa02c",
                        alpha=0.75, hatch="//" if empty else None)
            if whole and 0 < num(whole["lo"]) and num(whole["hi"]) < math.inf:
                # the scales every tensor accepts (blue), or the gap no scale bridges (red)
                color = "#d62728" if whole.get("empty") else "#1f77b4"
                edges = [math.log2(num(whole["lo"])), math.log2(num(whole["hi"]))]
                for x in edges:
                    ax.axvline(x, color=color, ls="--", lw=1)
                ax.axvspan(min(edges), max(edges), color=color, alpha=0.08, lw=0)
            ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=7)
            ax.set_ylim(len(rows) - 0.5, -0.5)
            ax.set_xlim(lo, hi)
            desc = f": {whole['describe']}" if whole and whole.get("describe") else ""
            ax.set_title(textwrap.fill(f"{title}{desc}", 95), fontsize=8, loc="left")
        axes[-1].set_xlabel("log2 loss scale S")
    return out[0]
