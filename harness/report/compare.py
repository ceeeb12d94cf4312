"""Two runs side by side (two torch versions, two GPUs, before and after a change): environment,
failure rates with their intervals, FP16 against BF16, and the cases whose outcome changed."""
from __future__ import annotations

from typing import Any

from ..results import case_key
from .tables import ENV_KEYS, PAIR, Table, counts_from_records, format_counts, failure_rate, rate_cell, wilson

__all__ = ["Run", "environment_diff", "rate_comparison", "pair_comparison", "outcome_changes", "compare_tables",
           "MAX_CHANGES"]

#: Rows of the outcome-change table (the count of the rest is in its note).
MAX_CHANGES = 200

Run = tuple[str, dict[str, Any], list[dict[str, Any]]]  # (label, header, records)


def environment_diff(a: Run, b: Run) -> Table:
    """Versions and hardware of both runs; a ``*`` marks what differs."""
    rows = []
    for k in (*ENV_KEYS, "tier", "seeds"):
        va = a[1].get("environment", {}).get(k, a[1].get("config", {}).get(k))
        vb = b[1].get("environment", {}).get(k, b[1].get("config", {}).get(k))
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
    ca, cb = counts_from_records(a[2])[0], counts_from_records(b[2])[0]
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
            cells.append(rate_cell(*failure_rate(format_counts(run[2], fmt))))
        rows.append(cells)
    return Table(f"{pair[0].upper()} against {pair[1].upper()}", ["compute", a[0], b[0]], rows)


def outcome_changes(a: Run, b: Run) -> Table:
    """Cases both runs hold whose outcome differs, with run B's reason; counts of cases in one run only."""
    ra = {case_key(r): r for r in a[2]}
    rb = {case_key(r): r for r in b[2]}
    common = [k for k in rb if k in ra]
    changed = [k for k in common if ra[k]["outcome"] != rb[k]["outcome"]]
    rows = [[k, ra[k]["outcome"], rb[k]["outcome"], str(rb[k].get("reason", ""))] for k in changed[:MAX_CHANGES]]
    more = f"; {len(changed) - MAX_CHANGES} more not shown" if len(changed) > MAX_CHANGES else ""
    note = (f"{len(common)} cases in both, {len(changed)} changed{more}; {len(ra) - len(common)} only in {a[0]}, "
            f"{len(rb) - len(common)} only in {b[0]}")
    return Table("Cases whose outcome changed", ["case", a[0], b[0], f"reason in {b[0]}"], rows, note)


def compare_tables(a: Run, b: Run) -> list[Table]:
    """Every comparison table, in report order."""
    return [environment_diff(a, b), rate_comparison(a, b), pair_comparison(a, b), outcome_changes(a, b)]
