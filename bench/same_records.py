"""Whether two ``check-model`` (or ``run``) directories hold the same records apart from timings: the
check that a change for speed changed no verdict and no number.

Compares ``records.jsonl`` (record by record, keyed by case and strategy) and ``diagnosis.json`` where
both have it, leaving out what measures time or memory (:data:`TIMING_KEYS`). Prints each difference as
``path: a != b`` and exits 1 when there is one, 0 when the directories agree.

Usage: ``python bench/same_records.py DIR_A DIR_B``
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: Keys whose values are timings or memory, different on every run.
TIMING_KEYS = frozenset({"seconds", "peak_bytes", "wall_seconds"})


def _strip(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _strip(x) for k, x in v.items() if k not in TIMING_KEYS and not k.startswith("seconds_")}
    if isinstance(v, list):
        return [_strip(x) for x in v]
    return v


def _records(d: Path) -> dict[str, Any]:
    out = {}
    for line in (d / "records.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out[f"{r['case']} {r['strategy']}"] = _strip(r)
    return out


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Every place where ``a`` and ``b`` differ, as ``path: a != b``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: {'missing' if k not in a else 'present'} != "
                           f"{'missing' if k not in b else 'present'}")
            else:
                out += differences(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{path}: {a!r} != {b!r}"]


def compare(a: Path, b: Path) -> list[str]:
    """The differences between run directories ``a`` and ``b`` apart from timings."""
    diffs = differences(_records(a), _records(b), "records")
    if (a / "diagnosis.json").exists() or (b / "diagnosis.json").exists():
        da, db = (_strip(json.loads((d / "diagnosis.json").read_text())) for d in (a, b))
        diffs += differences(da, db, "diagnosis")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    diffs = compare(args.a, args.b)
    for d in diffs:
        print(d)
    print(f"{len(diffs)} differences apart from timings between {args.a} and {args.b}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
