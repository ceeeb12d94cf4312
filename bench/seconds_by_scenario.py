"""Where a run's time went, from its records: the ``seconds`` of each record summed per scenario (the
first strategy of a case includes the case's reference), with the fastest and slowest record.

Usage: ``python bench/seconds_by_scenario.py RUN_DIR [--top N] [--scenario NAME]...`` (``--scenario``: also
each record of that scenario). Reads run files only (no torch).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.results import read_run  # noqa: E402


def by_scenario(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario: records, summed seconds, the fastest and slowest record (case, strategy, seconds);
    the slowest scenario first."""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        s = float(r.get("seconds") or 0.0)
        row = rows.setdefault(r["scenario"], {"scenario": r["scenario"], "records": 0, "seconds": 0.0,
                                              "fastest": None, "slowest": None})
        row["records"] += 1
        row["seconds"] += s
        me = (s, r["case"], r["strategy"])
        row["fastest"] = min(row["fastest"] or me, me)
        row["slowest"] = max(row["slowest"] or me, me)
    return sorted(rows.values(), key=lambda x: -x["seconds"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, metavar="RUN_DIR")
    ap.add_argument("--top", type=int, default=0, metavar="N", help="only the N slowest scenarios (0: all)")
    ap.add_argument("--scenario", action="append", default=[], metavar="NAME", help="also list its records")
    a = ap.parse_args(argv)
    header, records = read_run(a.run)
    rows = by_scenario(records)
    total = sum(x["seconds"] for x in rows)
    env = header.get("environment") or {}
    print(f"{len(records)} records, {total:.1f} s summed over records "
          f"({env.get('gpu') or env.get('device')}, commit {str(env.get('git_commit'))[:7]})")
    print(f"{'scenario':32s} {'records':>7s} {'seconds':>8s}  fastest / slowest record")
    for x in rows[:a.top or None]:
        f, sl = x["fastest"], x["slowest"]
        print(f"{x['scenario']:32s} {x['records']:7d} {x['seconds']:8.2f}  {f[0]:.3f} s ({f[1]} {f[2]}) / "
              f"{sl[0]:.3f} s ({sl[1]} {sl[2]})")
    for name in a.scenario:
        print(f"records of {name} (the first of a case includes its reference):")
        for r in (r for r in records if r["scenario"] == name):
            print(f"  {float(r.get('seconds') or 0.0):8.3f} s  {r['case']} {r['strategy']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
