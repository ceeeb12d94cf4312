"""Plots of failure rates and errors as inline SVG strings (matplotlib, no pyplot, no network).

Each function takes records (and nothing else of the harness) and returns one ``<svg>`` element, or
None when the run holds nothing to draw. Text from a run is never parsed as math, and matplotlib
escapes it into the SVG. Gradient plots live in :mod:`harness.report.gradplots`.
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Iterator

from ..results import num
from .tables import OUTCOMES, PAIR, compute_format, counts_from_records, format_counts, failure_rate, wilson

__all__ = ["figure", "log_axis", "short", "rates_svg", "family_heatmap_svg", "format_pair_svg", "error_vs_n_svg", "error_scatter_svg",
           "OUTCOME_COLORS", "FORMAT_COLORS"]

OUTCOME_COLORS = {"pass": "#5aa02c", "diverged": "#e69f00", "underflow": "#56b4e9", "overflow": "#d55e00",
                  "scale_exhausted": "#cc79a7", "stalled": "#b5a000", "unsupported": "#c8c8c8", "error": "#333333"}
FORMAT_COLORS = {"fp64": "#000000", "fp32": "#555555", "tf32": "#8c8c8c", "fp16": "#1f77b4", "bf16": "#d62728",
                 "fp8": "#9467bd"}
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")
STYLE = {"svg.fonttype": "none", "text.parse_math": False, "font.size": 9, "axes.spines.top": False,
         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8,
         "legend.frameon": False}


@contextlib.contextmanager
def figure(name: str, width: float, height: float, out: list[str]) -> Iterator[Any]:
    """A matplotlib Figure (no pyplot state); on exit its SVG is appended to ``out``.

    ``name`` salts the SVG's element ids so that several figures can live in one page."""
    import matplotlib
    from matplotlib.figure import Figure
    with matplotlib.rc_context({**STYLE, "svg.hashsalt": name}):
        fig = Figure(figsize=(width, height), layout="constrained")
        yield fig
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    out.append(text[text.index("<svg"):])


def log_axis(ax: Any, axis: str, base: int = 10) -> None:
    """A log axis whose tick labels are plain text (``1e-04``, ``4096``): run strings are never parsed
    as math, so the default mathtext labels are not available."""
    from matplotlib.ticker import FuncFormatter
    getattr(ax, f"set_{axis}scale")("log", base=base)
    fmt = FuncFormatter(lambda v, _: (f"{v:.0e}" if base == 10 else f"{v:g}") if v > 0 else "")
    getattr(ax, f"{axis}axis").set_major_formatter(fmt)


def short(text: str, width: int = 36) -> str:
    """A label cut to ``width`` characters (a long custom strategy spec would squeeze the axes away)."""
    text = str(text)
    return text if len(text) <= width else text[:width - 3] + "..."


def _fmt_color(fmt: str) -> str:
    return FORMAT_COLORS.get(fmt, "#17becf")


def rates_svg(runs: list[tuple[str, list[dict[str, Any]]]]) -> str | None:
    """Failure rate per strategy with 95% Wilson intervals; one bar per run when several are given."""
    counts = [(label, counts_from_records(recs)[0]) for label, recs in runs]
    strategies: list[str] = []
    for _, c in counts:
        strategies += [s for s in c if s not in strategies]
    if not strategies:
        return None
    out: list[str] = []
    k = len(counts)
    with figure("rates", 7.5, 0.9 + 0.28 * len(strategies) * max(1, k * 0.7), out) as fig:
        ax = fig.add_subplot()
        h = 0.8 / k
        for j, (label, c) in enumerate(counts):
            for i, s in enumerate(strategies):
                kf, n = failure_rate(c.get(s, {}))
                if not n:
                    continue
                lo, hi = wilson(kf, n)
                y = i + (j - (k - 1) / 2) * h
                spec = next((r for _, recs in runs for r in recs if r["strategy"] == s), {})
                color = _fmt_color(compute_format(spec)) if k == 1 else RUN_COLORS[j % len(RUN_COLORS)]
                ax.barh(y, 100 * kf / n, height=h * 0.9, color=color, alpha=0.85,
                        label=label if (k > 1 and i == 0) else None)
                ax.errorbar(100 * kf / n, y, xerr=[[100 * (kf / n - lo)], [100 * (hi - kf / n)]], fmt="none",
                            ecolor="black", capsize=2, lw=0.8)
                ax.text(100 * hi + 1.5, y, f"{kf}/{n}", va="center", fontsize=7)
        ax.set_yticks(range(len(strategies)), [short(s) for s in strategies])
        ax.invert_yaxis()
        ax.set_xlim(0, 112)
        ax.set_xlabel("failure rate, % of judged cases (bars: 95% Wilson interval)")
        if k > 1:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        else:
            fmts = sorted({compute_format(r) for _, recs in runs for r in recs})
            from matplotlib.patches import Patch
            ax.legend(handles=[Patch(color=_fmt_color(f), label=f) for f in fmts], title="compute",
                      loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return out[0]


def family_heatmap_svg(records: list[dict[str, Any]]) -> str | None:
    """Failure rate per family (rows) and strategy (columns), each cell annotated k/n."""
    by_s, by_f = counts_from_records(records)
    if not by_f:
        return None
    strategies, families = list(by_s), sorted(by_f)
    out: list[str] = []
    labels = [short(s) for s in strategies]
    height = 0.6 + 0.42 * len(families) + 0.065 * max(len(x) for x in labels)  # room for the slanted labels
    with figure("heatmap", max(5.0, 0.55 * len(strategies) + 2), height, out) as fig:
        ax = fig.add_subplot()
        ax.grid(False)
        grid = [[math.nan] * len(strategies) for _ in families]
        for i, f in enumerate(families):
            for j, s in enumerate(strategies):
                kf, n = failure_rate(by_f[f].get(s, {}))
                if n:
                    grid[i][j] = kf / n
                    ax.text(j, i, f"{kf}/{n}", ha="center", va="center", fontsize=7,
                            color="white" if kf / n > 0.6 else "black")
        im = ax.imshow(grid, cmap="Reds", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(strategies)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(families)), families)
        fig.colorbar(im, ax=ax, label="failure rate", shrink=0.8)
    return out[0]


def format_pair_svg(records: list[dict[str, Any]], pair: tuple[str, str] = PAIR) -> str | None:
    """FP16 and BF16 side by side per family: stacked outcome shares, failure rate with its interval."""
    recs = [r for r in records if compute_format(r) in pair]
    if not recs:
        return None
    families = sorted({r["family"] for r in recs}) + ["all"]
    out: list[str] = []
    with figure("pair", max(5.0, 1.1 * len(families) + 1.5), 3.4, out) as fig:
        ax = fig.add_subplot()
        w = 0.38
        for i, fam in enumerate(families):
            for j, fmt in enumerate(pair):
                c = format_counts(recs, fmt, None if fam == "all" else fam)
                total = sum(c.values())
                if not total:
                    continue
                x, bottom = i + (j - 0.5) * w, 0.0
                for o in OUTCOMES:
                    if c.get(o):
                        share = 100 * c[o] / total
                        ax.bar(x, share, w * 0.92, bottom=bottom, color=OUTCOME_COLORS[o],
                               edgecolor=_fmt_color(fmt), linewidth=1.2)
                        bottom += share
                kf, n = failure_rate(c)
                if n:
                    lo, hi = wilson(kf, n)
                    ax.errorbar(x, 100 * (1 - kf / n), yerr=[[100 * (hi - kf / n)], [100 * (kf / n - lo)]],
                                fmt="_", color="black", capsize=2, lw=0.8)
                ax.text(x, 101, fmt, ha="center", va="bottom", fontsize=7, color=_fmt_color(fmt))
        ax.set_xticks(range(len(families)), families)
        ax.set_ylim(0, 110)
        ax.set_ylabel("% of cases (whisker: 95% CI of the pass share)")
        from matplotlib.patches import Patch
        used = [o for o in OUTCOMES if any(r["outcome"] == o for r in recs)]
        ax.legend(handles=[Patch(color=OUTCOME_COLORS[o], label=o) for o in used], loc="upper left",
                  bbox_to_anchor=(1.0, 1.0))
    return out[0]


def _err(r: dict[str, Any]) -> float | None:
    m = r.get("metrics") or {}
    return num(m["rel_err"]) if "rel_err" in m else None


def error_vs_n_svg(records: list[dict[str, Any]]) -> str | None:
    """rel_err against the reduction length n, per compute format, with each format's bound drawn.

    Exact results (rel_err 0) cannot sit on a log axis and are counted in the title; inf/NaN errors
    are drawn as triangles at the top edge."""
    pts = [(r, _err(r)) for r in records if compute_format(r) not in ("fp32", "fp64") and r.get("n")
           and r.get("bound") is not None and _err(r) is not None]
    if not pts:
        return None
    pts = [(r, e) for r, e in pts if 0 < num(r["bound"]) < math.inf]  # a NaN/inf bound has no place on the axis
    if not pts:
        return None
    finite = [e for _, e in pts if 0 < e < math.inf]
    bounds = [num(r["bound"]) for r, _ in pts]
    lo = min(finite + bounds) / 3
    top = max(finite + bounds) * 3
    exact = sum(1 for _, e in pts if e == 0)
    fmts = sorted({compute_format(r) for r, _ in pts})
    jitter = {f: 2 ** (0.12 * (i - (len(fmts) - 1) / 2)) for i, f in enumerate(fmts)}
    out: list[str] = []
    with figure("errn", 7.5, 4.2, out) as fig:
        ax = fig.add_subplot()
        for f in fmts:
            mine = [(r, e) for r, e in pts if compute_format(r) == f]
            col = _fmt_color(f)
            ok = [(r["n"] * jitter[f], e) for r, e in mine if r["outcome"] == "pass" and 0 < e < math.inf]
            bad = [(r["n"] * jitter[f], e) for r, e in mine if r["outcome"] != "pass" and 0 < e < math.inf]
            inf = [r["n"] * jitter[f] for r, e in mine if not e < math.inf]
            if ok:
                ax.scatter(*zip(*ok), s=14, color=col, alpha=0.7, label=f"{f} pass")
            if bad:
                ax.scatter(*zip(*bad), s=22, color=col, marker="x", label=f"{f} failed")
            if inf:
                ax.scatter(inf, [top] * len(inf), s=26, color=col, marker="^", label=f"{f} inf/NaN")
            best: dict[int, float] = {}
            for r, _ in mine:
                best[r["n"]] = min(best.get(r["n"], math.inf), num(r["bound"]))
            ns = sorted(best)
            ax.plot(ns, [best[n] for n in ns], ls="--", color=col, lw=1.2, marker="_", ms=12,
                    label=f"{f} bound")
        log_axis(ax, "x", 2)
        log_axis(ax, "y")
        ax.set_ylim(lo, top * 1.6)
        ax.set_xlabel("reduction length n (the bound's n)")
        ax.set_ylabel("normwise relative error rel_err")
        ax.set_title(f"error against reduction length ({len(pts) - exact} results"
                     + (f"; {exact} exact, not drawn" if exact else "") + ")", fontsize=9)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return out[0]


def error_scatter_svg(a: list[dict[str, Any]], b: list[dict[str, Any]], labels: tuple[str, str]) -> str | None:
    """rel_err of the cases two runs share, run A against run B, with the diagonal (equal error)."""
    from ..results import case_key
    ea = {case_key(r): (r, _err(r)) for r in a}
    pts = []
    for r in b:
        k = case_key(r)
        eb = _err(r)
        if k in ea and eb is not None and ea[k][1] is not None and 0 < ea[k][1] < math.inf and 0 < eb < math.inf:
            pts.append((ea[k][1], eb, compute_format(r)))
    if not pts:
        return None
    lo = min(min(x, y) for x, y, _ in pts) / 2
    hi = max(max(x, y) for x, y, _ in pts) * 2
    out: list[str] = []
    with figure("scatter", 5.2, 4.4, out) as fig:
        ax = fig.add_subplot()
        for f in sorted({p[2] for p in pts}):
            xs, ys = zip(*[(x, y) for x, y, g in pts if g == f])
            ax.scatter(xs, ys, s=14, color=_fmt_color(f), alpha=0.7, label=f)
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls=":")
        log_axis(ax, "x")
        log_axis(ax, "y")
        ax.set_xlabel(f"rel_err in {labels[0]}")
        ax.set_ylabel(f"rel_err in {labels[1]}")
        ax.legend(title="compute")
    return out[0]
