"""Failure-rate tables from run summaries or records, as rich tables or plain text."""
from __future__ import annotations

import math
from typing import Any, Iterable

__all__ = ["wilson", "counts_from_records", "failure_table_rows", "render_failure_table"]

FAILURES = ("diverged", "overflow", "underflow", "scale_exhausted", "stalled", "error")


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for k failures out of n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, c - h), min(1.0, c + h))


def counts_from_records(records: Iterable[dict[str, Any]]) -> tuple[dict, dict]:
    """(by_strategy, by_family) outcome counts, as the runner's summary holds them."""
    by_s: dict[str, dict[str, int]] = {}
    by_f: dict[str, dict[str, dict[str, int]]] = {}
    for r in records:
        s, f, o = r["strategy"], r["family"], r["outcome"]
        by_s.setdefault(s, {})[o] = by_s.get(s, {}).get(o, 0) + 1
        fam = by_f.setdefault(f, {}).setdefault(s, {})
        fam[o] = fam.get(o, 0) + 1
    return by_s, by_f


def _rate(c: dict[str, int]) -> tuple[int, int]:
    judged = sum(v for k, v in c.items() if k != "unsupported")
    return sum(c.get(k, 0) for k in FAILURES), judged


def _cell(c: dict[str, int] | None) -> str:
    if not c:
        return "-"
    k, n = _rate(c)
    if n == 0:
        return "unsupp."
    return f"{k}/{n} {100 * k / n:.0f}%"


def failure_table_rows(by_strategy: dict, by_family: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per strategy, overall failure rate with its Wilson interval, then per family."""
    families = sorted(by_family)
    head = ["strategy", "failed/judged", "rate [95% CI]", *families]
    rows = []
    for s, c in by_strategy.items():
        k, n = _rate(c)
        lo, hi = wilson(k, n)
        rate = f"{100 * k / n:.1f}% [{100 * lo:.0f}-{100 * hi:.0f}]" if n else "-"
        rows.append([s, f"{k}/{n}", rate, *(_cell(by_family[f].get(s)) for f in families)])
    return head, rows


def render_failure_table(by_strategy: dict, by_family: dict, title: str = "failure rate by strategy and family",
                         console: Any = None) -> str:
    """Print the table (rich on a terminal, plain otherwise); returns the plain text too."""
    head, rows = failure_table_rows(by_strategy, by_family)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    plain = "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in [head, *rows])
    if console is not None:
        from rich.table import Table
        t = Table(title=title)
        for h in head:
            t.add_column(h, justify="left" if h == "strategy" else "right")
        for r in rows:
            t.add_row(*r)
        console.print(t)
    return f"{title}\n{plain}"
