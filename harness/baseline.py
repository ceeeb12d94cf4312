"""Baseline files of the gate: made from a run, written and read with memory that does not depend on
what each record holds.

A **baseline** is one JSON file: the schema version, the device class (:func:`harness.results.device_class`),
the environment it was made in, and per case key ``case#seed|strategy`` the scenario, family, strategy,
outcome, the key error metrics (``rel_err``, ``grad_rel_err``, ``loss_divergence``, 4 significant digits),
the bound and, in files from runs whose records carry it, the margin (worst error / bound).

In memory a case is 44 packed bytes (:class:`BaseCase` unpacks it), so a baseline of a million cases
fits in a few hundred MB; the file is read member by member (:func:`harness.results.iter_object_members`)
and written case by case. Imports only :mod:`harness.results`.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from .results import (ERROR_METRICS, OUTCOMES, SCHEMA_VERSION, InputError, RunFileError, case_key, clean,
                      device_class, is_number, iter_object_members, num)

__all__ = ["BASELINE_KIND", "UPDATE_HINT", "BaseCase", "as_case", "make_baseline", "write_baseline",
           "load_baseline", "nondeterministic"]

BASELINE_KIND = "mp-harness baseline"
UPDATE_HINT = "python -m harness gate RUN_DIR --baseline {path} --update"
_PACK = struct.Struct("<BB5d")  # outcome index, presence bits, bound, the three error metrics, margin
_NONDET = 1 << 7


class BaseCase(NamedTuple):
    """What the gate compares of one baseline case; a value absent from the file is None."""

    outcome: str
    bound: float | None
    metrics: dict[str, float]  # only the error metrics the file holds
    margin: float | None
    nondeterministic: bool


def _sig(x: Any) -> Any:
    """4 significant digits: baselines stay stable across CPUs whose last bits differ."""
    v = num(x)
    return float(f"{v:.4g}") if math.isfinite(v) else x


def nondeterministic(r: dict[str, Any]) -> bool:
    """Whether a record's (or a baseline case's) FP32 reference differed between two runs of itself."""
    return bool(r.get("nondeterministic") or (r.get("reference") or {}).get("nondeterministic"))


def _pack(outcome: str, bound: Any, metrics: dict[str, Any], margin: Any, nondet: bool) -> bytes:
    vals = [bound, *(metrics.get(k) for k in ERROR_METRICS), margin]
    bits = sum(1 << i for i, v in enumerate(vals) if v is not None) | (_NONDET if nondet else 0)
    return _PACK.pack(OUTCOMES.index(outcome), bits, *(num(v) for v in vals))


def _unpack(b: bytes) -> BaseCase:
    o, bits, *vals = _PACK.unpack(b)
    got = [v if bits >> i & 1 else None for i, v in enumerate(vals)]
    metrics = {k: v for k, v in zip(ERROR_METRICS, got[1:4]) if v is not None}
    return BaseCase(OUTCOMES[o], got[0], metrics, got[4], bool(bits & _NONDET))


def as_case(b: Any) -> BaseCase:
    """A baseline case as the gate reads it, from its packed form or from a dict of :func:`make_baseline`."""
    if isinstance(b, bytes):
        return _unpack(b)
    m = b.get("metrics") or {}
    return BaseCase(b["outcome"], None if b.get("bound") is None else num(b["bound"]),
                    {k: num(m[k]) for k in ERROR_METRICS if m.get(k) is not None},
                    None if b.get("margin") is None else num(b["margin"]), nondeterministic(b))


def _entry(r: dict[str, Any]) -> tuple[str, str, bytes]:
    """(scenario, family, packed case) of a record, its numbers cut to 4 significant digits."""
    m = r.get("metrics") or {}
    return (sys.intern(str(r.get("scenario"))), sys.intern(str(r.get("family"))),
            _pack(r["outcome"], None if r.get("bound") is None else _sig(r["bound"]),
                  {k: _sig(m[k]) for k in ERROR_METRICS if k in m and m[k] is not None},
                  None if r.get("margin") is None else _sig(r["margin"]), nondeterministic(r)))


def _entry_dict(key: str, e: tuple[str, str, bytes]) -> dict[str, Any]:
    """The JSON object of one baseline case (the file's layout)."""
    c = _unpack(e[2])
    d: dict[str, Any] = {"scenario": e[0], "family": e[1], "strategy": key.rpartition("|")[2], "outcome": c.outcome,
                         "bound": c.bound, "metrics": c.metrics}
    if c.margin is not None:
        d["margin"] = c.margin
    if c.nondeterministic:
        d["nondeterministic"] = True
    return clean(d)


def _entries(records: Iterable[dict[str, Any]], source: str) -> dict[str, tuple[str, str, bytes]]:
    out: dict[str, tuple[str, str, bytes]] = {}
    for r in records:
        k = case_key(r)
        if k in out:
            raise RunFileError(f"{source}: two records for {k}; a run holds one record per case and strategy")
        out[k] = _entry(r)
    return out


def _meta(header: dict[str, Any], source: str) -> dict[str, Any]:
    cfg = header.get("config") or {}
    return {"kind": BASELINE_KIND, "schema_version": SCHEMA_VERSION, "device_class": device_class(header),
            "environment": header.get("environment") or {}, "created": header.get("created"), "source_run": source,
            "tier": cfg.get("tier"), "seeds": cfg.get("seeds")}


def make_baseline(header: dict[str, Any], records: Iterable[dict[str, Any]], source: str = "") -> dict[str, Any]:
    """The baseline of a run as a dict (see module doc); ``source`` names the run it was made from."""
    entries = _entries(records, source or "run")
    return {**_meta(header, source), "cases": {k: _entry_dict(k, entries[k]) for k in sorted(entries)}}


def write_baseline(path: Path, header: dict[str, Any], records: Iterable[dict[str, Any]], source: str = "") -> int:
    """Write the baseline of a streamed run to ``path`` by atomic replace, case by case (the same bytes as
    ``write_json_atomic(path, make_baseline(...))``); returns the number of cases."""
    entries = _entries(records, source or "run")
    n = len(entries)  # the whole run is read (and checked) before anything is created
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            head = json.dumps(clean(_meta(header, source)), indent=1)
            f.write(head[:-2] + ',\n "cases": {')
            for i, k in enumerate(sorted(entries)):
                body = json.dumps(_entry_dict(k, entries.pop(k)), indent=1).replace("\n", "\n  ")
                f.write(("," if i else "") + f"\n  {json.dumps(k)}: {body}")
            f.write("\n }\n}\n" if n else "}\n}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def _case(key: str, v: Any, where: str) -> bytes:
    """One baseline case checked and packed; a RunFileError names the case and what is wrong."""
    def bad(what: str) -> RunFileError:
        return RunFileError(f"baseline {where}: case {key!r}: {what}; regenerate the baseline with "
                            f"`{UPDATE_HINT.format(path=where)}`")
    if not isinstance(v, dict):
        raise bad(f"is a JSON {type(v).__name__}, expected an object")
    if v.get("outcome") not in OUTCOMES:
        raise bad(f"outcome {v.get('outcome')!r} is not one of {', '.join(OUTCOMES)}")
    m = v.get("metrics", {})
    if not isinstance(m, dict):
        raise bad(f"metrics is a JSON {type(m).__name__}, expected an object")
    for k, x in [("bound", v.get("bound")), ("margin", v.get("margin")), *((f"metrics.{k}", m.get(k)) for k in ERROR_METRICS)]:
        if x is not None and not is_number(x):
            raise bad(f"{k} is {x!r}, expected a number or null")
    return _pack(v["outcome"], v.get("bound"), m, v.get("margin"), bool(v.get("nondeterministic")))


def load_baseline(path: Path | str) -> dict[str, Any]:
    """Read and check a baseline file, case by case; its ``cases`` map keys to packed cases (read them with
    :func:`as_case`). Raises InputError with one line naming the fix."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"baseline {p} is a directory; pass the baseline's JSON file, e.g. results/baselines/cpu.json")
    if not p.is_file():
        raise InputError(f"baseline {p} does not exist; write one with `{UPDATE_HINT.format(path=p)}`")
    not_ours = InputError(f"{p} is not a harness baseline (expected kind {BASELINE_KIND!r} and a 'cases' object)")
    b: dict[str, Any] = {}
    cases: dict[str, bytes] = {}
    try:
        with open(p, encoding="utf-8") as f:
            for inner, key, v in iter_object_members(f, "cases"):
                if inner is None:
                    b[key] = v
                    if key == "kind" and v != BASELINE_KIND:
                        raise not_ours
                else:
                    cases[key] = _case(key, v, str(p))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        why = "nested too deep" if isinstance(exc, RecursionError) else exc
        raise InputError(f"baseline {p}: unreadable ({why}); regenerate it with `{UPDATE_HINT.format(path=p)}`") from None
    except InputError:
        raise
    except ValueError:  # JSON, but not an object
        raise not_ours from None
    if b.get("kind") != BASELINE_KIND or not isinstance(b.get("cases"), dict):
        raise not_ours
    if b.get("schema_version") != SCHEMA_VERSION or isinstance(b.get("schema_version"), bool):
        raise InputError(f"baseline {p} has schema version {b.get('schema_version')!r}, this harness writes "
                         f"{SCHEMA_VERSION}; regenerate it with `{UPDATE_HINT.format(path=p)}`")
    b["cases"] = cases
    return b
