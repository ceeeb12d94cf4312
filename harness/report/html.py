"""The HTML report: one self-contained file (inline SVG and CSS, no script, nothing fetched).

Sections of a run: environment; failure rate per strategy and family with 95% Wilson intervals;
FP16 against BF16 with the breakdown by outcome; error against reduction length with the bound;
the gradient-magnitude histogram against the formats' ranges; scale trajectories; per-layer loss-scale
windows; the device profile when records carry one; the failing cases with their reasons. Two runs get
a comparison first, then the sections of each. Every string from a run goes through ``html.escape``.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from . import gradplots, plots
from ..results import FAILURES
from .compare import Run, compare_tables
from .separation import separation_tables
from .tables import (Table, environment_table, failure_table, family_table, format_comparison_table,
                     margin_table, outcome_table)

__all__ = ["render_html", "write_html", "run_sections", "table_html", "profiles", "MAX_FAILURES"]

#: Rows of the failing-cases table (the rest are counted).
MAX_FAILURES = 500

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#222;margin:0;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:1rem 2rem 3rem;background:#fff}
h1{font-size:1.6rem;margin:.6rem 0}h2{border-bottom:2px solid #e4e4e4;padding-bottom:.2rem;margin-top:2.2rem}
h3{margin:1.4rem 0 .4rem}nav{display:flex;flex-wrap:wrap;gap:.3rem 1rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:12.5px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f4f7}tr:nth-child(even) td{background:#fbfbfd}
figure{margin:.6rem 0 1.2rem}figure svg{max-width:100%;height:auto}
figcaption,.note{color:#555;font-size:12.5px}.empty{color:#888;font-style:italic}
.scroll{overflow-x:auto}td{overflow-wrap:break-word}
td.o-pass{color:#2e7d32}td.o-fail{color:#c62828;font-weight:600}td.o-note{color:#777}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def table_html(t: Table, outcome_cols: tuple[int, ...] = (), title: bool = True) -> str:
    """A Table as escaped HTML: its title (unless ``title`` is false), header, rows, note. Cells of
    ``outcome_cols`` are coloured: ``pass`` green, ``unexpected`` and failures red, ``expected`` grey."""
    head = "".join(f"<th>{_e(h)}</th>" for h in t.head) if any(t.head) else ""
    body = []
    for row in t.rows:
        cells = []
        for i, c in enumerate(row):
            cls = ""
            if i in outcome_cols:
                cls = {"pass": ' class="o-pass"', "unsupported": "", "": ""}.get(c, ' class="o-fail"')
                cls = ' class="o-note"' if c.startswith("expected") else cls
            cells.append(f"<td{cls}>{_e(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = f'<p class="note">{_e(t.note)}</p>' if t.note else ""
    h3 = f"<h3>{_e(t.title)}</h3>" if title else ""
    if not body:
        return f'{h3}<p class="empty">none</p>{note}'
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f'{h3}<div class="scroll"><table>{thead}<tbody>{"".join(body)}</tbody></table></div>{note}'


def _figure(svg: str | None, caption: str, empty: str) -> str:
    if svg is None:
        return f'<p class="empty">{_e(empty)}</p>'
    return f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>"


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(d, dict):
        out: list[tuple[str, str]] = []
        for k, v in d.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    text = json.dumps(d) if isinstance(d, list) else str(d)
    return [(prefix, text if len(text) <= 300 else text[:297] + "...")]


def profiles(records: list[dict[str, Any]]) -> list[Table]:
    """Device profiles carried by records (``profile`` in the record or its metrics), one table per
    distinct profile, naming the cases that carry it."""
    seen: dict[str, tuple[dict, list[str]]] = {}
    for r in records:
        p = r.get("profile") or (r.get("metrics") or {}).get("profile")
        if isinstance(p, dict) and p:
            key = json.dumps(p, sort_keys=True, default=str)
            seen.setdefault(key, (p, []))[1].append(f"{r.get('case', r.get('scenario'))} {r.get('strategy')}")
    tables = []
    for p, where in seen.values():
        more = f" and {len(where) - 3} more" if len(where) > 3 else ""
        tables.append(Table(f"Profile from {', '.join(where[:3])}{more}", ["key", "value"],
                            [list(kv) for kv in _flatten(p)]))
    return tables


def _declared(r: dict[str, Any]) -> str:
    exp = (r.get("expected") or {}).get("outcome")
    return "expected" if exp == r["outcome"] else (f"unexpected (declared {exp})" if exp else "unexpected")


def _failures(records: list[dict[str, Any]]) -> Table:
    """Failing records, the unexpected ones (no declared expected failure matches) first."""
    bad = [r for r in records if r["outcome"] in FAILURES]
    bad.sort(key=lambda r: _declared(r) == "expected")
    rows = [[str(r.get("case", r.get("scenario"))), str(r.get("seed")), r["strategy"], r["outcome"], _declared(r),
             str(r.get("reason", ""))] for r in bad[:MAX_FAILURES]]
    more = f"; {len(bad) - MAX_FAILURES} more not shown" if len(bad) > MAX_FAILURES else ""
    unexpected = sum(1 for r in bad if _declared(r) != "expected")
    return Table("Failing cases", ["case", "seed", "strategy", "outcome", "declared", "reason"], rows,
                 f"{len(bad)} failing records, {unexpected} of them unexpected (listed first){more}")


Section = tuple[str, str, str]  # (id, title, body html)


def run_sections(label: str, header: dict[str, Any], records: list[dict[str, Any]], prefix: str = "") -> list[Section]:
    """Every section of one run (see module doc); ``prefix`` keeps element ids unique across runs."""
    recs = records
    secs: list[Section] = [
        ("env", "Environment", table_html(environment_table(header, recs), title=False)),
        ("rates", "Failure rate per strategy and family",
         _figure(plots.rates_svg([(label, recs)]), "Failure rate per strategy, coloured by compute format, with "
                 "95% Wilson intervals.", "no records") + table_html(failure_table(recs))
         + _figure(plots.family_heatmap_svg(recs), "Failure rate per family and strategy (k/n in each cell).",
                   "no records") + table_html(family_table(recs))),
        ("pair", "FP16 against BF16",
         _figure(plots.format_pair_svg(recs), "Share of cases per outcome for the strategies computing in FP16 "
                 "and in BF16, per family; whiskers: 95% Wilson interval.", "no FP16 or BF16 records")
         + table_html(format_comparison_table(recs)) + table_html(outcome_table(recs))
         + table_html(margin_table(recs))),
        ("error-n", "Error against reduction length",
         _figure(plots.error_vs_n_svg(recs), "Normwise relative error of reduced-precision strategies against "
                 "the reduction length n; dashed: each format's bound (smallest at each n).",
                 "no records with rel_err, bound and n")),
        ("grad-hist", "Gradient magnitudes against the formats' ranges",
         _figure(gradplots.grad_histogram_svg(recs), "Histogram of log2|g| of the FP32 reference gradients per "
                 "case; bottom: where each format flushes to zero, is subnormal, normal, overflows.",
                 "no gradient histograms in this run (records without window.log2_hist)")),
        ("scale", "Loss-scale trajectories",
         _figure(gradplots.scale_trajectories_svg(recs), "Dynamic loss scalers: log2 of the scale per step "
                 "(identical trajectories share a line).", "no dynamic scaler changed its scale in this run")),
        ("windows", "Per-layer loss-scale windows",
         _figure(gradplots.windows_svg(recs), "FP16 loss-scale window [S_lo, S_hi] of each tensor's reference "
                 "gradients: green, a scale S in it keeps at most 1% of the tensor's non-zero gradients from "
                 "flushing to zero and none from overflowing; red (hatched), no scale does. Dashed blue: the scales "
                 "that work for every tensor of a model; dashed red: the gap no single scale bridges.",
                 "no gradient windows in this run")),
    ]
    sep = separation_tables(recs)
    if sep:
        secs.append(("recipes", "Which scenario separates which recipes", "".join(table_html(t) for t in sep)))
    prof = profiles(recs)
    if prof:
        secs.append(("profile", "Device profile", "".join(table_html(t) for t in prof)))
    secs.append(("failures", "Failing cases", table_html(_failures(recs), outcome_cols=(3, 4), title=False)))
    return [(prefix + i, t, b) for i, t, b in secs]


def _asv_section(asv_dir: Path | None) -> Section | None:
    """The asv history plot, when :mod:`harness.report.asv_history` exists and has results to draw."""
    if asv_dir is None or not Path(asv_dir).is_dir():
        return None
    from .asv_history import history_svg
    try:
        svg = history_svg(asv_dir)
    except Exception as exc:  # a broken history must not cost the rest of the report
        return ("asv", "History across commits (asv)", f'<p class="empty">{_e(f"no asv history: {exc}")}</p>')
    return ("asv", "History across commits (asv)", _figure(svg or None, "asv results across commits.",
                                                            "no asv results"))


def render_html(runs: list[Run], asv_dir: Path | None = None, title: str | None = None) -> str:
    """The whole page for one run or two (compared first), as a string."""
    sections: list[Section] = []
    if len(runs) == 2:
        a, b = runs
        body = "".join(table_html(t, outcome_cols=(1, 2) if t.title.startswith("Cases") else ())
                       for t in compare_tables(a, b))
        body += _figure(plots.rates_svg([(a[0], a[2]), (b[0], b[2])]), "Failure rate per strategy in both runs "
                        "(95% Wilson intervals).", "no records")
        body += _figure(plots.error_scatter_svg(a[2], b[2], (a[0], b[0])), "rel_err of the cases both runs hold; "
                        "dotted: equal error.", "no common cases with a finite non-zero rel_err")
        sections.append(("compare", f"{a[0]} against {b[0]}", body))
    for i, (label, header, records) in enumerate(runs):
        prefix = f"r{i}-" if len(runs) > 1 else ""
        secs = run_sections(label, header, records, prefix)
        if len(runs) > 1:
            secs = [(sid, f"{label}: {t}", b) for sid, t, b in secs]
        sections += secs
    asv = _asv_section(asv_dir)
    if asv:
        sections.append(asv)
    title = title or "mp-harness report: " + " against ".join(r[0] for r in runs)
    nav = "".join(f'<a href="#{_e(i)}">{_e(t)}</a>' for i, t, _ in sections)
    body = "".join(f'<section id="{_e(i)}"><h2>{_e(t)}</h2>{b}</section>' for i, t, b in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><main><h1>{_e(title)}</h1><nav>{nav}</nav>{body}</main></body></html>\n')


def write_html(path: Path, runs: list[Run], asv_dir: Path | None = None) -> None:
    """Write :func:`render_html`'s page to ``path`` (UTF-8)."""
    Path(path).write_text(render_html(runs, asv_dir), encoding="utf-8")

