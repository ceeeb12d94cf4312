"""Tables of a run: failure rates with Wilson intervals, FP16 against BF16, outcomes, environment.

Every table is a :class:`Table` (title, header, rows, note) built from records alone, then rendered as
plain text here, as Markdown by :mod:`harness.report.markdown` or as HTML by :mod:`harness.report.html`.
This module imports nothing of the harness but :mod:`harness.results` (pure functions of run files).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..results import FAILURES, OUTCOMES, SEVERITY, tally
from .summary import RunSummary, compute_format, summarize

__all__ = ["OUTCOMES", "FAILURES", "SEVERITY", "Table", "wilson", "counts_from_records", "failure_rate",
           "failure_table_rows", "render_failure_table", "render_text", "compute_format", "format_counts", "format_strategies", "outcome_counts", "failure_table",
           "family_table", "format_comparison_table", "outcome_table", "environment_table", "margin_table", "pct",
           "rate_cell", "RunSummary", "summarize"]

#: The two 16-bit formats the FP16-against-BF16 comparison sets side by side.
PAIR = ("fp16", "bf16")


@dataclass
class Table:
    """A titled table of strings; ``note`` says how to read it."""

    title: str
    head: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for k failures out of n (``(0, 1)`` when n is 0).

    >>> [round(x, 4) for x in wilson(0, 10)]
    [0.0, 0.2775]
    """
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # The interval always holds p; in floating point c - h can land an ulp above 0 at k = 0 and c + h an
    # ulp below 1 at k = n, which would hand a plot a negative error bar. Clamp to [0, p] and [p, 1].
    return (min(p, max(0.0, c - h)), max(p, min(1.0, c + h)))


def counts_from_records(records: Iterable[dict[str, Any]]) -> tuple[dict, dict]:
    """(by_strategy, by_family) outcome counts, as the runner's summary holds them."""
    by_s: dict[str, dict[str, int]] = {}
    by_f: dict[str, dict[str, dict[str, int]]] = {}
    for r in records:
        tally(by_s, by_f, r)
    return by_s, by_f


def failure_rate(counts: dict[str, int]) -> tuple[int, int]:
    """(failures, judged cases) of outcome counts: unsupported cases are not judged."""
    unknown = set(counts) - set(OUTCOMES)
    assert not unknown, f"outcomes {sorted(unknown)} reached a count: records are checked on read"
    failed = sum(counts.get(k, 0) for k in FAILURES)
    return failed, failed + counts.get("pass", 0)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def rate_cell(k: int, n: int) -> str:
    """``3/19 15.8% [5-38]``: failures, rate and its 95% Wilson interval in percent."""
    if n == 0:
        return "-"
    lo, hi = wilson(k, n)
    return f"{k}/{n} {pct(k / n)} [{100 * lo:.0f}-{100 * hi:.0f}]"


def _cell(c: dict[str, int] | None) -> str:
    if not c:
        return "-"
    k, n = failure_rate(c)
    if n == 0:
        return "unsupp."
    return f"{k}/{n} {100 * k / n:.0f}%"


def failure_table_rows(by_strategy: dict, by_family: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per strategy, overall failure rate with its Wilson interval, then per family."""
    families = sorted(by_family)
    head = ["strategy", "failed/judged", "rate [95% CI]", *families]
    rows = []
    for s, c in by_strategy.items():
        k, n = failure_rate(c)
        lo, hi = wilson(k, n)
        rate = f"{100 * k / n:.1f}% [{100 * lo:.0f}-{100 * hi:.0f}]" if n else "-"
        rows.append([s, f"{k}/{n}", rate, *(_cell(by_family[f].get(s)) for f in families)])
    return head, rows


def render_text(table: Table) -> str:
    """Plain text: the title, then left-aligned columns two spaces apart, then the note."""
    widths = [max(len(str(x)) for x in col) for col in zip(table.head, *table.rows)]
    lines = [table.title] + ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
                             for r in [table.head, *table.rows]]
    return "\n".join(lines + ([table.note] if table.note else []))


def render_failure_table(by_strategy: dict, by_family: dict, title: str = "failure rate by strategy and family",
                         console: Any = None) -> str:
    """Print the table with rich when ``console`` is given; returns the plain text either way."""
    head, rows = failure_table_rows(by_strategy, by_family)
    if console is not None:
        from rich.table import Table as RichTable
        t = RichTable(title=title)
        for h in head:
            t.add_column(h, justify="left" if h == "strategy" else "right")
        for r in rows:
            t.add_row(*r)
        console.print(t)
    return render_text(Table(title, head, rows))


# -- the tables of one run -------------------------------------------------------------------------
Records = Iterable[dict[str, Any]] | RunSummary


def failure_table(records: Records) -> Table:
    """Failure rate per strategy (95% Wilson interval), and per family in the columns."""
    sm = summarize(records)
    head, rows = failure_table_rows(sm.by_strategy, sm.by_family)
    return Table("Failure rate by strategy and family", head, rows,
                 "failed/judged over all cases (unsupported cases are not judged); [lo-hi] is the 95% Wilson "
                 "interval in percent")


def family_table(records: Records) -> Table:
    """Failure rate per family over all strategies but the FP32 reference preset."""
    sm = summarize(records)
    rows = []
    for f, per_s in sorted(sm.by_family.items()):
        c: dict[str, int] = {}
        for s, counts in per_s.items():
            if s != "fp32":
                for o, v in counts.items():
                    c[o] = c.get(o, 0) + v
        if c:
            rows.append([f, rate_cell(*failure_rate(c))])
    return Table("Failure rate by family", ["family", "failed/judged rate [95% CI]"], rows,
                 "all strategies but fp32 (the reference preset) pooled")


def outcome_counts(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Records per outcome."""
    c: dict[str, int] = {}
    for r in records:
        c[r["outcome"]] = c.get(r["outcome"], 0) + 1
    return c


def format_counts(records: Iterable[dict[str, Any]], fmt: str, family: str | None = None) -> dict[str, int]:
    """Records per outcome of every strategy computing in ``fmt`` pooled (within ``family`` if given)."""
    return outcome_counts(r for r in records if compute_format(r) == fmt and family in (None, r["family"]))


def format_strategies(records: Iterable[dict[str, Any]], fmt: str) -> list[str]:
    """The strategies of ``records`` that compute in ``fmt``, sorted."""
    return sorted({r["strategy"] for r in records if compute_format(r) == fmt})


def format_comparison_table(records: Records, pair: tuple[str, str] = PAIR) -> Table:
    """FP16 against BF16 per family: every strategy computing in each format pooled, with the outcomes."""
    sm = summarize(records)
    a, b = pair
    fams = sorted({fam for (fmt, fam) in sm.by_format if fmt in pair})
    head = ["family", f"{a} rate [95% CI]", f"{a} outcomes", f"{b} rate [95% CI]", f"{b} outcomes"]
    rows = []
    for f in [*fams, "all"]:
        cells = [f]
        for fmt in pair:
            c = sm.format_counts(fmt, None if f == "all" else f)
            cells += [rate_cell(*failure_rate(c)), _breakdown(c)]
        rows.append(cells)
    note = "; ".join(f"{fmt}: {', '.join(sm.format_strategies(fmt)) or 'none'}" for fmt in pair)
    return Table(f"{a.upper()} against {b.upper()}", head, rows, f"strategies pooled per format: {note}")


def _breakdown(c: dict[str, int]) -> str:
    return " ".join(f"{o} {c[o]}" for o in OUTCOMES if c.get(o)) or "-"


def outcome_table(records: Records) -> Table:
    """Cases per strategy and outcome (the breakdown behind every failure rate)."""
    sm = summarize(records)
    used = [o for o in OUTCOMES if any(o in c for c in sm.by_strategy.values())]
    rows = [[s, sm.formats[s], *(str(c.get(o, 0)) for o in used)] for s, c in sm.by_strategy.items()]
    return Table("Outcomes by strategy", ["strategy", "compute", *used], rows)


def _median(xs: Any) -> float:
    v = sorted(xs)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def margin_table(records: Records) -> Table:
    """Per strategy, the margin (worst error / bound) of its passing cases: how close a pass came to failing."""
    sm = summarize(records)
    rows = []
    for s, counts in sm.by_strategy.items():
        ms, bad = sm.margins.get(s, ()), sm.nonfinite_margins.get(s, 0)
        if not len(ms) and not bad:
            continue
        cells = [f"{_median(ms):.3g}", f"{max(ms):.3g}"] if len(ms) else ["-", "-"]
        rows.append([s, f"{len(ms) + bad}/{counts.get('pass', 0)}", *cells, str(bad) if bad else ""])
    note = ("margin = the worst error metric / the bound it was judged against (1 = at the bound); "
            + ("records without a margin (older runs) are not counted" if rows else
               "no passing record carries a margin (a run from before records had one)"))
    return Table("Margin of passing cases", ["strategy", "with margin/passed", "median", "max", "non-finite"], rows,
                 note)


ENV_KEYS = ("harness", "git_commit", "torch", "cuda", "gpu", "gpu_capability", "driver", "cpu", "cpu_count",
            "python", "platform")


def environment_table(header: dict[str, Any], records: Records) -> Table:
    """What the run ran on and with: versions, hardware, tier, seeds, status, record count."""
    env, cfg = header.get("environment") or {}, header.get("config") or {}
    rows = [[k, str(env[k])] for k in ENV_KEYS if env.get(k) is not None]
    rows += [["created", str(header.get("created", "?"))], ["status", str(header.get("status", "?"))],
             ["tier", str(cfg.get("tier", "?"))], ["seeds", str(cfg.get("seeds", "?"))],
             ["records", f"{summarize(records).records} (expected {header.get('expected_records', '?')})"]]
    return Table("Environment", ["", ""], rows)
