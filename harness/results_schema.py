"""The schema of run files, checked on read, and a streaming reader for large JSON objects.

Every record a view reads goes through :func:`check_record`, so a hostile or hand-edited line (an
outcome the harness does not know, ``metrics`` as a list, a field of the wrong type) is one
:class:`RunFileError` naming the file and line, never a traceback deep inside a report and never a
record silently counted as something it is not. :func:`iter_object_members` reads a JSON object
(a baseline with a million cases) member by member with bounded memory.

This module imports nothing of the harness; :mod:`harness.results` re-exports what views need.
"""
from __future__ import annotations

import json
import math
import re
from typing import IO, Any, Iterator

__all__ = ["SCHEMA_VERSION", "OUTCOMES", "ERROR_METRICS", "InputError", "RunFileError", "check_record",
           "check_header", "check_schema_version", "is_number", "iter_object_members"]

SCHEMA_VERSION = 1
#: A record's ``outcome``: the verdicts of :mod:`harness.judge.verdict`. They live here, with the schema,
#: so that reports and the gate read them without importing the engine.
OUTCOMES = ("pass", "diverged", "overflow", "underflow", "scale_exhausted", "stalled", "unsupported", "error")
#: The errors a verdict bounds and the gate compares: the output's and the gradients' normwise relative
#: errors, and a training run's loss-curve divergence.
ERROR_METRICS = ("rel_err", "grad_rel_err", "loss_divergence")
NON_FINITE = ("inf", "-inf", "nan")


class InputError(ValueError):
    """Bad input from the user (a flag, a file, a name) raised on purpose: the command line prints its
    message as one line and exits 2. Other exceptions are faults of the harness (see README)."""


class RunFileError(InputError):
    """A run file that cannot be used (missing, unreadable, corrupted, another schema version)."""


def is_number(x: Any) -> bool:
    """A number as run files hold it: int or float (not bool), or ``"inf"``, ``"-inf"``, ``"nan"``."""
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) or x in NON_FINITE


def _kind(x: Any) -> str:
    text = json.dumps(x) if isinstance(x, (str, int, float, bool)) or x is None else f"a JSON {_JSON.get(type(x), type(x).__name__)}"
    return text if len(text) <= 40 else text[:37] + "..."


_JSON = {dict: "object", list: "array", str: "string"}
_STR, _DICT, _INT, _NUM = "a string", "an object", "an integer", "a number (or \"inf\", \"-inf\", \"nan\")"
_CHECKS: dict[str, tuple[Any, str]] = {  # field: (check, what is allowed)
    "scenario": (lambda x: isinstance(x, str) and x != "", "a non-empty " + _STR[2:]),
    "family": (lambda x: isinstance(x, str) and x != "", "a non-empty " + _STR[2:]),
    "strategy": (lambda x: isinstance(x, str) and x != "", "a non-empty " + _STR[2:]),
    "outcome": (lambda x: x in OUTCOMES, "one of " + ", ".join(OUTCOMES)),
    "metrics": (lambda x: isinstance(x, dict), _DICT),
}
_OPTIONAL: dict[str, tuple[Any, str]] = {  # checked when present and not null
    "case": (lambda x: isinstance(x, str), _STR), "strategy_spec": (lambda x: isinstance(x, str), _STR),
    "reason": (lambda x: isinstance(x, str), _STR), "device": (lambda x: isinstance(x, str), _STR),
    "params": (lambda x: isinstance(x, dict), _DICT), "expected": (lambda x: isinstance(x, dict), _DICT),
    "reference": (lambda x: isinstance(x, dict), _DICT), "window": (lambda x: isinstance(x, dict), _DICT),
    "seed": (lambda x: isinstance(x, int) and not isinstance(x, bool), _INT),
    "n": (lambda x: isinstance(x, int) and not isinstance(x, bool) and x > 0, "an integer > 0"),
    "bound": (is_number, _NUM), "margin": (is_number, _NUM), "seconds": (is_number, _NUM),
}


def check_schema_version(v: Any, where: str, what: str = "a record has") -> None:
    """Raise RunFileError unless ``v`` is the integer :data:`SCHEMA_VERSION` (``"1"`` and ``1.0`` are not)."""
    if isinstance(v, int) and not isinstance(v, bool) and v == SCHEMA_VERSION:
        return
    if isinstance(v, int) and not isinstance(v, bool):
        raise RunFileError(f"{where}: {what} schema version {v}, this harness reads {SCHEMA_VERSION}; "
                           "re-run with this version")
    raise RunFileError(f"{where}: schema_version is {_kind(v)}, expected the integer {SCHEMA_VERSION}; "
                       "the file was not written by the harness: re-run, or restore it")


_OUTCOME_SET = frozenset(OUTCOMES)
_NUM_TYPES = (int, float, str)  # str: one of NON_FINITE, checked after the type
_TYPES = {"case": (str,), "strategy_spec": (str,), "reason": (str,), "device": (str,), "params": (dict,),
          "expected": (dict,), "reference": (dict,), "window": (dict,), "seed": (int,), "n": (int,),
          "bound": _NUM_TYPES, "margin": _NUM_TYPES, "seconds": _NUM_TYPES}


def _fine(rec: dict[str, Any]) -> bool:
    """The checks of :func:`check_record` as one fast predicate (``type(x) is``: a bool is no int here)."""
    g = rec.get
    v, s, f, st, o, m = g("schema_version"), g("scenario"), g("family"), g("strategy"), g("outcome"), g("metrics")
    if not (type(v) is int and v == SCHEMA_VERSION and type(s) is str and s and type(f) is str and f
            and type(st) is str and st and type(o) is str and o in _OUTCOME_SET and type(m) is dict):
        return False
    for key, types in _TYPES.items():
        x = g(key)
        if x is not None and (type(x) not in types or (type(x) is str and types is _NUM_TYPES and x not in NON_FINITE)):
            return False
    n = g("n")
    if n is not None and n <= 0:
        return False
    for key in ERROR_METRICS:
        x = m.get(key)
        if x is not None and (type(x) not in _NUM_TYPES or (type(x) is str and x not in NON_FINITE)):
            return False
    return _nested_problem(rec) is None


def _num(x: Any) -> bool:
    return type(x) in (int, float) or (type(x) is str and x in NON_FINITE)


def _nested_problem(rec: dict[str, Any]) -> str | None:
    """What is wrong inside the nested fields the HTML report draws (``window``, ``metrics.scaler``), or
    None: their shape is part of the schema, so a hostile one is an error on read, not a crash in a plot."""
    w = rec.get("window")
    if w is not None:
        for key in ("lo", "hi"):
            if w.get(key) is not None and not _num(w[key]):
                return f"window.{key} is {_kind(w[key])}; expected {_NUM}"
        per = w.get("per_tensor")
        if per is not None:
            if type(per) is not dict:
                return f"window.per_tensor is {_kind(per)}; expected an object"
            for name, t in per.items():
                if type(t) is not dict or not all(k in t and (t[k] is None or _num(t[k])) for k in ("lo", "hi")):
                    return f"window.per_tensor.{name} is {_kind(t)}; expected an object with lo and hi (numbers or null)"
        h = w.get("log2_hist")
        if h is not None:
            if (type(h) is not dict or type(h.get("lo")) is not int or type(h.get("counts")) is not list
                    or not all(type(c) is int and c >= 0 for c in h["counts"]) or type(h.get("formats")) is not dict):
                return (f"window.log2_hist is {_kind(h)}; expected an object with an integer lo, a list of counts "
                        "(integers >= 0) and an object of formats")
            for fmt, r in h["formats"].items():
                if type(r) is not dict or not all(type(v) in (int, float) and v > 0 for v in r.values()):
                    return f"window.log2_hist.formats.{fmt} is {_kind(r)}; expected an object of positive numbers"
    sc = rec["metrics"].get("scaler")
    if sc is not None:
        if type(sc) is not dict:
            return f"metrics.scaler is {_kind(sc)}; expected an object"
        traj, stride = sc.get("trajectory"), sc.get("trajectory_stride")
        if traj is not None and (type(traj) is not list or not all(_num(x) for x in traj)):
            return f"metrics.scaler.trajectory is {_kind(traj)}; expected a list of numbers"
        if stride is not None and (type(stride) is not int or stride < 1):
            return f"metrics.scaler.trajectory_stride is {_kind(stride)}; expected an integer >= 1"
    return None


def check_record(rec: dict[str, Any], where: str) -> None:
    """Raise RunFileError (one line, naming ``where``, e.g. ``DIR/records.jsonl:12``) unless ``rec`` holds
    the fields a view reads, each of the type the schema gives it."""
    if _fine(rec):  # the common case, fast; the checks below say what is wrong
        return
    _explain(rec, where)
    raise RunFileError(f"{where}: the record does not match the schema; re-run, or delete the line")


def _explain(rec: dict[str, Any], where: str) -> None:
    check_schema_version(rec.get("schema_version"), where)
    for key, (ok, allowed) in _CHECKS.items():
        if key not in rec or not ok(rec[key]):
            got = "missing" if key not in rec else f"is {_kind(rec[key])}"
            raise RunFileError(f"{where}: record field {key!r} {got}; expected {allowed} (the line was not "
                               "written by this harness version: re-run, or delete the line)")
    for key, (ok, allowed) in _OPTIONAL.items():
        if rec.get(key) is not None and not ok(rec[key]):
            raise RunFileError(f"{where}: record field {key!r} is {_kind(rec[key])}; expected {allowed} or null")
    for key in ERROR_METRICS:
        v = rec["metrics"].get(key)
        if v is not None and not is_number(v):
            raise RunFileError(f"{where}: metrics.{key} is {_kind(v)}; expected {_NUM} or null")
    problem = _nested_problem(rec)
    if problem:
        raise RunFileError(f"{where}: record field {problem} (re-run, or delete the line)")


def check_header(header: Any, where: str) -> None:
    """Raise RunFileError unless a ``run.json`` is an object of this schema version whose
    ``environment``, ``config`` and ``summary`` (where present) are objects."""
    if not isinstance(header, dict):
        raise RunFileError(f"{where}: expected a JSON object (a run header), got {_kind(header)}")
    check_schema_version(header.get("schema_version"), where, "run header has")
    for key in ("environment", "config", "summary"):
        if header.get(key) is not None and not isinstance(header[key], dict):
            raise RunFileError(f"{where}: {key!r} is {_kind(header[key])}; expected an object (the header was "
                               "not written by the harness: re-run, or restore run.json)")
    if header.get("status") is not None and not isinstance(header["status"], str):
        raise RunFileError(f"{where}: 'status' is {_kind(header['status'])}; expected a string")


def finite(x: Any) -> bool:
    """Whether a run-file value is a finite number."""
    return is_number(x) and math.isfinite(float(x))


# -- a JSON object, member by member ---------------------------------------------------------------
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class _Stream:
    """A text file read in chunks, parsed one JSON value at a time (the consumed part is dropped)."""

    def __init__(self, f: IO[str], chunk: int = 1 << 20) -> None:
        self.f, self.chunk, self.buf, self.pos, self.eof = f, chunk, "", 0, False

    def _fill(self, need: int = 0) -> bool:
        data = self.f.read(max(self.chunk, need))
        if not data:
            self.eof = True
            return False
        self.buf, self.pos = self.buf[self.pos:] + data, 0
        return True

    def peek(self) -> str:
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self._fill():
                return self.buf[self.pos:self.pos + 1]

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise json.JSONDecodeError(f"expected one of {chars!r}", self.buf, self.pos)
        self.pos += 1
        return c

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                v, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if self.eof or not self._fill(len(self.buf) - self.pos):  # read as much again: linear overall
                    raise
                continue
            if end == len(self.buf) and not self.eof and self._fill():  # a number cut at the chunk's end
                continue
            self.pos = end
            return v


def iter_object_members(f: IO[str], inner: str, chunk: int = 1 << 20) -> Iterator[tuple[str | None, str, Any]]:
    """Members of the JSON object in ``f``: ``(None, key, value)`` for each top-level member, and for the
    top-level member ``inner``, when it is an object, ``(None, inner, {})`` then ``(inner, key, value)`` for
    each of its members, one at a time.

    Raises ``json.JSONDecodeError`` for text that is not JSON, ``ValueError`` for JSON that is no object,
    and ``RecursionError`` for a value nested too deep. ``chunk``: characters read at a time."""
    s = _Stream(f, chunk)
    if s.peek() != "{":
        if s.peek() in '["-0123456789tfn':
            raise ValueError("not a JSON object")
        raise json.JSONDecodeError("expected '{'", s.buf, s.pos)
    s.expect("{")
    if s.peek() == "}":
        s.expect("}")
    else:
        while True:
            key = s.value()
            if not isinstance(key, str):
                raise json.JSONDecodeError("expected a member name", s.buf, s.pos)
            s.expect(":")
            if key == inner and s.peek() == "{":
                yield None, key, {}  # a placeholder: the members follow
                yield from _members(s, inner)
            else:
                yield None, key, s.value()
            if s.expect(",}") == "}":
                break
    if s.peek():
        raise json.JSONDecodeError("extra data after the object", s.buf, s.pos)


def _members(s: _Stream, inner: str) -> Iterator[tuple[str | None, str, Any]]:
    s.expect("{")
    if s.peek() == "}":
        s.expect("}")
        return
    while True:
        key = s.value()
        if not isinstance(key, str):
            raise json.JSONDecodeError("expected a member name", s.buf, s.pos)
        s.expect(":")
        yield inner, key, s.value()
        if s.expect(",}") == "}":
            return
