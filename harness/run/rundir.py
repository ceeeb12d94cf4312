"""A run directory across sessions: what a resume keeps, drops and refuses, and how big a run may be.

A resume keeps the records of the original matrix (the first of each (case, seed, strategy)); it moves
duplicates and records of cases outside the matrix to ``dropped-records.jsonl`` (nothing is deleted)
and says so in one line. It keeps the header's ``created`` and ``environment`` and appends its own to
``resumes``; it refuses to continue on another torch, GPU or commit, whose numbers could differ from the
records already there.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

from ..results import read_header, read_records

__all__ = ["DROPPED", "check_size", "done_keys", "resumed_header", "SAME_ENVIRONMENT"]

DROPPED = "dropped-records.jsonl"
#: Environment fields a resume must share with the run it completes.
SAME_ENVIRONMENT = ("torch", "cuda", "gpu", "git_commit", "device")


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.1f} s"


def check_size(n_cases: int, n_strategies: int, limit: int | None, per_record: float) -> None:
    """Refuse a matrix of more than ``limit`` records (ValueError with the estimate of records and time)."""
    total = n_cases * n_strategies
    if limit is not None and total > limit:
        raise ValueError(f"this run would write {total:,} records ({n_cases:,} cases x {n_strategies} strategies), "
                         f"more than --max-records {limit:,}; the harness's own {per_record * 1000:g} ms a record "
                         f"alone would take {_duration(total * per_record)}; lower --seeds or select fewer "
                         "scenarios or strategies, or raise --max-records if you mean it")


def done_keys(out: Path, matrix: set[tuple[str, str]] | None = None) -> tuple[set[tuple[str, str]], list[dict]]:
    """(keys, records) already in a run directory, rewritten cleanly: a torn line dropped, and (with
    ``matrix``, the run's (case key, strategy) pairs) duplicates and foreign records moved aside."""
    path = out / "records.jsonl"
    if not path.exists():
        return set(), []
    keys: set[tuple[str, str]] = set()
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    from ..results import case_seed_key
    for r in read_records(path):
        k = (case_seed_key(r), r.get("strategy"))
        if matrix is not None and (k in keys or k not in matrix):
            dropped.append(r)
            continue
        keys.add(k)
        kept.append(r)
    if dropped:
        with open(out / DROPPED, "a") as f:
            for r in dropped:
                f.write(json.dumps(r, separators=(",", ":")) + "\n")
        dup = sum(1 for r in dropped if (case_seed_key(r), r.get("strategy")) in keys)
        warnings.warn(f"{path}: moved {dup} duplicate and {len(dropped) - dup} foreign records (not of this run's "
                      f"matrix) to {out / DROPPED}", stacklevel=2)
    tmp = out / ".records.jsonl.resume"
    with open(tmp, "w") as f:
        for r in kept:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return keys, kept


def resumed_header(out: Path, env: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """The header a resume writes: the original's, with this session (``env``, ``changes`` such as a
    longer timeout) appended to ``resumes``; ValueError where ``env`` differs from the original's in
    :data:`SAME_ENVIRONMENT`."""
    old = {k: v for k, v in read_header(out).items() if k not in ("status", "summary", "schema_version")}
    before = old.get("environment") or {}
    differ = [f"{k} {before.get(k)!r} -> {env.get(k)!r}" for k in SAME_ENVIRONMENT
              if k in before and before.get(k) != env.get(k)]
    if differ:
        raise ValueError(f"--resume {out}: this run was started with another environment ({'; '.join(differ)}); "
                         "its records would not be comparable with new ones; resume it where it ran, or start a "
                         "new run")
    session = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "environment": env,
               **changes}
    return dict(old, resumes=list(old.get("resumes") or []) + [session])


def matrix_keys(cases: Iterable[Any], labels: list[str]) -> set[tuple[str, str]]:
    """Every (case key, strategy label) of a matrix."""
    return {(c.key, label) for c in cases for label in labels}
