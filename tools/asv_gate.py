"""Gate on asv results: compare two result sets and exit 1 on a regression beyond a factor.

``asv compare`` prints the changes but always exits 0; CI needs an exit code. Usage::

    python tools/asv_gate.py BASE NEW [--factor 1.5] [--results-dir results/asv] [--machine NAME]
                             [--bench REGEX]

BASE and NEW are asv result files (``results/asv/<machine>/<commit>-<env>.json``) or commit hashes
(a prefix of at least 4 hex digits) looked up under ``--results-dir`` (``--machine`` picks one when
several machines have results for the commit). Every value present in both, for benchmarks of the
same version, is compared:

- lower is better for ``time_*``, ``peakmem_*`` and ``mem_*``; a ``track_*`` gets its direction from
  its unit (from ``benchmarks.json``): lower is better for ``%``, ``relative error``, ``seconds``,
  ``ms`` and ``bytes``, higher for a rate ending in ``/s`` (``TFLOP/s``); a track with another unit
  (``records``: how big the matrix is) has no direction and is listed as a note, not gated;
- a regression is a value worse than the base by more than ``--factor`` (for lower-is-better:
  new > base * factor, including any rise from exactly 0; for higher-is-better: new < base / factor),
  or a value that the base had and that failed in NEW.

Exit 0: no regression; 1: at least one; 2: bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the harness of this checkout

from harness.cli import Parser  # noqa: E402

from harness.report.asv_history import AsvResult, benchmark_info, load_results, param_label, read_result_file  # noqa: E402

#: Benchmark kinds whose values the gate compares (by the method name's prefix).
COMPARED = re.compile(r"^(time|timeraw|peakmem|mem|track)_")
#: Units of ``track_*`` benchmarks for which a lower value is better.
LOWER_UNITS = ("%", "relative error", "seconds", "ms", "bytes")


@dataclass(frozen=True)
class Change:
    """One compared value: benchmark, parameters, base and new values, whether higher is better."""

    name: str
    params: tuple[str, ...]
    base: float
    new: float | None
    higher_is_better: bool
    unit: str = ""

    @property
    def ratio(self) -> float:
        """How many times worse NEW is (> 1 worse, < 1 better); inf when it failed or rose from 0."""
        if self.new is None:
            return math.inf
        worse, better = (self.base, self.new) if self.higher_is_better else (self.new, self.base)
        if better == 0:
            return 1.0 if worse == 0 else math.inf
        return worse / better

    def describe(self) -> str:
        label = f"{self.name}({param_label(self.params)})" if self.params else self.name
        unit = f" {self.unit}" if self.unit else ""
        if self.new is None:
            return f"{label}: {self.base:.4g}{unit} -> failed"
        r = self.ratio
        how, times = ("worse", r) if r > 1 else ("better", (1 / r if r > 0 else math.inf))  # both as factors >= 1
        return f"{label}: {self.base:.4g} -> {self.new:.4g}{unit} (x{times:.2f} {how})"


def higher_is_better(name: str, unit: str) -> bool | None:
    """Whether a higher value of the benchmark is better; None when its unit gives no direction."""
    if not name.rsplit(".", 1)[-1].startswith("track_"):
        return False
    if unit.endswith("/s"):
        return True
    return False if unit in LOWER_UNITS else None


def compare(base: AsvResult, new: AsvResult, info: dict[str, dict], bench: re.Pattern | None = None
            ) -> tuple[list[Change], list[str]]:
    """(changes for every value present in both, notes about what was not compared)."""
    changes, notes = [], []
    for name in sorted(base.values):
        if bench is not None and not bench.search(name):
            continue
        if not COMPARED.match(name.rsplit(".", 1)[-1]):
            continue
        if name not in new.values:
            notes.append(f"{name}: not in {new.short}")
            continue
        if base.versions.get(name) != new.versions.get(name):
            notes.append(f"{name}: version changed ({base.versions.get(name)} -> {new.versions.get(name)}), not compared")
            continue
        unit = str(info.get(name, {}).get("unit", ""))
        hib = higher_is_better(name, unit)
        if hib is None:
            notes.append(f"{name}: unit {unit or '(none)'!r} says neither higher nor lower is better, not gated")
            continue
        for key, b in base.values[name].items():
            if b is None or math.isnan(b) or key not in new.values[name]:
                continue
            n = new.values[name][key]
            if n is not None and math.isnan(n):
                notes.append(f"{name}({param_label(key)}): skipped in {new.short}")
                continue
            changes.append(Change(name, key, b, n, hib, unit))
    return changes, notes


def resolve(spec: str, results_dir: Path, machine: str | None) -> AsvResult:
    """A result file path, or a commit prefix looked up under ``results_dir``; ValueError if neither."""
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ValueError(f"{spec}: no such result file")
        return read_result_file(path)
    if not re.fullmatch(r"[0-9a-fA-F]{4,40}", spec):
        raise ValueError(f"{spec!r} is neither a result file nor a commit hash (4 to 40 hex digits)")
    found = [r for r in load_results(results_dir) if r.commit.startswith(spec.lower())
             and (machine is None or r.machine == machine)]
    if not found:
        where = f" for machine {machine}" if machine else ""
        raise ValueError(f"no asv results for commit {spec}{where} under {results_dir}; record them with "
                         "tools/asv_history.sh")
    if len({(r.machine, r.commit) for r in found}) > 1:
        choices = sorted({f"{r.machine}:{r.short}" for r in found})
        raise ValueError(f"commit {spec} is ambiguous under {results_dir} ({', '.join(choices)}); "
                         "pass --machine or a longer hash")
    return found[-1]



def _factor(text: str) -> float:
    try:
        f = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (f >= 1 and math.isfinite(f)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 1, got {text}")
    return f


def main(argv: Sequence[str] | None = None) -> int:
    p = Parser(prog="tools/asv_gate.py", description="Exit 1 when NEW's asv results regress from BASE's "
                "beyond a factor; 0 otherwise; 2 on bad input.")
    p.add_argument("base", metavar="BASE", help="result file or commit hash")
    p.add_argument("new", metavar="NEW", help="result file or commit hash")
    p.add_argument("--factor", type=_factor, default=1.5, help="tolerated worsening factor (default 1.5)")
    p.add_argument("--results-dir", type=Path, default=Path("results/asv"))
    p.add_argument("--machine", default=None, help="machine whose results a commit hash refers to")
    p.add_argument("--bench", default=None, metavar="REGEX", help="compare only benchmarks matching REGEX")
    try:
        args = p.parse_args(argv)
        try:
            bench = re.compile(args.bench) if args.bench else None
        except re.error as exc:
            raise ValueError(f"--bench {args.bench!r}: not a regular expression ({exc})") from None
        base = resolve(args.base, args.results_dir, args.machine)
        new = resolve(args.new, args.results_dir, args.machine)
        if base.machine != new.machine:
            print(f"note: comparing results of two machines ({base.machine} and {new.machine})", file=sys.stderr)
        changes, notes = compare(base, new, benchmark_info(args.results_dir), bench)
        if not changes:
            raise ValueError(f"{base.short} and {new.short} share no benchmark value to compare"
                             + (f" matching {args.bench!r}" if args.bench else ""))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bad = [c for c in changes if c.ratio > args.factor]
    for c in bad:
        print(f"REGRESSION {c.describe()}")
    for c in changes:
        if c.ratio < 1 / args.factor:
            print(f"improved   {c.describe()}")
    for n in notes:
        print(f"note       {n}")
    print(f"asv gate: {len(bad)} regression(s) beyond x{args.factor:g} in {len(changes)} values "
          f"({base.machine} {base.short} -> {new.machine} {new.short})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
