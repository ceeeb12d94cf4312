"""One pass over a run's records into the counts every table needs, with memory flat in the record count.

:class:`RunSummary` keeps outcome counts per strategy, per (family, strategy) and per (compute format,
family), each strategy's spec, and the margins (worst error / bound) of passing records per strategy as
8-byte floats. Tables are built from it, so ``report`` streams a run of any size: a million records cost
the counts (a few KB) plus 8 bytes per passing record that carries a margin.
"""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..results import num, tally

__all__ = ["RunSummary", "compute_format", "summarize"]


def compute_format(record: dict[str, Any]) -> str:
    """The ``compute=`` field of a record's strategy spec (``fp16``, ``bf16``...; ``?`` if absent)."""
    for part in str(record.get("strategy_spec", "")).split(","):
        key, _, value = part.partition("=")
        if key.strip() == "compute":
            return value.strip()
    return "?"


@dataclass
class RunSummary:
    """Counts of a run's records (see module doc); :meth:`add` one record at a time."""

    records: int = 0
    by_strategy: dict[str, dict[str, int]] = field(default_factory=dict)
    by_family: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    by_format: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)  # (format, family)
    specs: dict[str, str] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)  # strategy -> compute format
    margins: dict[str, array] = field(default_factory=dict)  # finite margins of passing records
    nonfinite_margins: dict[str, int] = field(default_factory=dict)

    def add(self, r: dict[str, Any]) -> None:
        """Count one (checked) record."""
        self.records += 1
        s, o = r["strategy"], r["outcome"]
        tally(self.by_strategy, self.by_family, r)
        if s not in self.specs:
            self.specs[s] = str(r.get("strategy_spec", ""))
            self.formats[s] = compute_format(r)
        c = self.by_format.setdefault((compute_format(r), r["family"]), {})
        c[o] = c.get(o, 0) + 1
        if o == "pass" and r.get("margin") is not None:
            m = num(r["margin"])
            if math.isfinite(m):
                self.margins.setdefault(s, array("d")).append(m)
            else:  # a pass with an inf/NaN margin is counted, never ordered among the others
                self.nonfinite_margins[s] = self.nonfinite_margins.get(s, 0) + 1

    def format_counts(self, fmt: str, family: str | None = None) -> dict[str, int]:
        """Records per outcome of every strategy computing in ``fmt`` pooled (within ``family`` if given)."""
        out: dict[str, int] = {}
        for (f, fam), c in self.by_format.items():
            if f == fmt and family in (None, fam):
                for o, v in c.items():
                    out[o] = out.get(o, 0) + v
        return out

    def format_strategies(self, fmt: str) -> list[str]:
        """The strategies computing in ``fmt``, sorted."""
        return sorted(s for s, f in self.formats.items() if f == fmt)


def summarize(records: Iterable[dict[str, Any]] | RunSummary) -> RunSummary:
    """A RunSummary of ``records`` (read once), or ``records`` itself when it is one."""
    if isinstance(records, RunSummary):
        return records
    s = RunSummary()
    for r in records:
        s.add(r)
    return s
