"""Two runs side by side (two torch versions, two GPUs, before and after a change): environment,
failure rates with their intervals, FP16 against BF16, and the cases whose outcome changed."""
from __future__ import annotations

from typing import Any, Iterable

from ..results import case_key
from .tables import ENV_KEYS, PAIR, Table, failure_rate, rate_cell, summarize, wilson

__all__ = ["Run", "environment_diff", "rate_comparison", "pair_comparison", "outcome_changes", "compare_tables",
           "MAX_CHANGES"]

#: Rows of the outcome-change table (the count of the rest is in its note).
MAX_CHANGES = 200

Run = tuple[str, dict[str, Any], Iterable[dict[str, Any]]]  # (label, header, records: a list or RunRecords)


def environment_diff(a: Run, b: Run) -> Table:
    """Versions and hardware of both runs; a ``*`` marks what differs."""
    rows = []
    for k in (*ENV_KEYS, "tier", "seeds"):
        va = (a[1].get("environment") or {}).get(k, (a[1].get("config") or {}).get(k))
        vb = (b[1].get("environment") or {}).get(k, (b[1].get("config") or {}).get(k))
        if va is None and vb is None:
            continue
        rows.append([k, "-" if va is None else str(va), "-" if vb is None else str(vb), "*" if va != vb else ""])
    return Table("Environment", ["", a[0], b[0], "differs"], rows)


def _overlap(ka: int, na: int, kb: int, nb: int) -> bool:
    la, ha = wilson(ka, na)
    lb, hb = wilson(kb, nb)
    return not (ha < lb or hb < la)


def rate_comparison(a: Run, b: Run) -> Table:
    """Failure rate per strategy in both runs; ``*`` where the 95% Wilson intervals do not overlap."""
    ca, cb = summarize(a[2]).by_strategy, summarize(b[2]).by_strategy
    rows = []
    for s in [*ca, *(s for s in cb if s not in ca)]:
        ka, na = failure_rate(ca.get(s, {}))
        kb, nb = failure_rate(cb.get(s, {}))
        change = f"{100 * (kb / nb - ka / na):+.1f}" if na and nb else "-"
        sig = "*" if na and nb and not _overlap(ka, na, kb, nb) else ""
        rows.append([s, rate_cell(ka, na), rate_cell(kb, nb), change, sig])
    return Table("Failure rate by strategy", ["strategy", a[0], b[0], "change (points)", "CIs apart"], rows,
                 "rates with 95% Wilson intervals in percent; * marks intervals that do not overlap")


def pair_comparison(a: Run, b: Run, pair: tuple[str, str] = PAIR) -> Table:
    """FP16 and BF16 (all strategies computing in each pooled) in both runs."""
    rows = []
    for fmt in pair:
        cells = [fmt]
        for run in (a, b):
            cells.append(rate_cell(*failure_rate(summarize(run[2]).format_counts(fmt))))
        rows.append(cells)
    return Table(f"{pair[0].upper()} against {pair[1].upper()}", ["compute", a[0], b[0]], rows)


def outcome_changes(a: Run, b: Run) -> Table:
    """Cases both runs hold whose outcome differs, with run B's reason; counts of cases in one run only.
    Holds run A's outcome per case, and streams run B."""
    ra = {case_key(r): r["outcome"] for r in a[2]}
    rows: list[list[str]] = []
    common = changed = 0
    only_b = 0
    for r in b[2]:
        k = case_key(r)
        oa = ra.get(k)
        if oa is None:
            only_b += 1
            continue
        common += 1
        if oa != r["outcome"]:
            changed += 1
            if len(rows) < MAX_CHANGES:
                rows.append([k, oa, r["outcome"], str(r.get("reason", ""))])
    more = f"; {changed - MAX_CHANGES} more not shown" if changed > MAX_CHANGES else ""
    note = (f"{common} cases in both, {changed} changed{more}; {len(ra) - common} only in {a[0]}, "
            f"{only_b} only in {b[0]}")
    return Table("Cases whose outcome changed", ["case", a[0], b[0], f"reason in {b[0]}"], rows, note)


def compare_tables(a: Run, b: Run) -> list[Table]:
    """Every comparison table, in report order."""
    sa, sb = (a[0], a[1], summarize(a[2])), (b[0], b[1], summarize(b[2]))  # one pass each for the counts
    return [environment_diff(a, b), rate_comparison(sa, sb), pair_comparison(sa, sb), outcome_changes(a, b)]
