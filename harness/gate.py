"""The regression gate: a run against a committed baseline, for CI.

The baseline file is described in :mod:`harness.baseline`. Rules, each finding naming the case (or
strategy) and the numbers:

* **outcome** - a case got worse: ``pass`` to anything else, or a failure to a more severe one
  (:data:`harness.results.SEVERITY`); the reverse is an improvement;
* **error** - a case passing in both grew an error metric by more than ``error_factor``, or an error
  that was finite became inf or NaN (always a regression, never an improvement); errors below
  ``error_floor`` times the case's bound are not compared (a 1000x growth of 1e-10 is noise), nor are
  the errors of a case whose FP32 reference was nondeterministic in either run (GPU kernels that add in
  another order each run, :mod:`harness.run.reference`): that is a notice, while its outcome is still gated;
* **rate** - over the cases both hold (a run of one family is compared with that family's part of the
  baseline), a strategy's failure rate rose by more than ``rate_margin`` *and* the run's 95% Wilson
  interval lies above the baseline's rate, so a case or two flipping in a large sample does not trip it;
* **missing** / **new** - cases in only one of the two (missing is a regression unless allowed; new
  cases are listed, and fail the gate only with ``fail_on_new``).

The run is read one record at a time: memory holds the baseline's packed cases and the findings, not the
run. Exit codes of ``python -m harness gate``: 0 nothing got worse, 1 a regression, 2 bad input, 3 an
internal error of the harness, 4 the system failed (disk full; :mod:`harness.exits`). The gate imports only :mod:`harness.results` (and its
own :mod:`harness.baseline` and the pure :mod:`harness.report.tables`): it is a pure function of run
files, and runs on a laptop with runs copied from a GPU box.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable

from .baseline import (BASELINE_KIND, BaseCase, as_case, load_baseline, make_baseline, nondeterministic,
                       write_baseline)
from .report.tables import failure_rate, pct, wilson
from .results import ERROR_METRICS, SEVERITY, InputError, RunFileError, RunRecords, case_key, device_class, num, read_header

__all__ = ["Thresholds", "Finding", "GateResult", "make_baseline", "load_baseline", "check_compatible",
           "compare", "render", "add_command", "ERROR_METRICS", "BASELINE_KIND"]


@dataclass(frozen=True)
class Thresholds:
    """How much worse counts as a regression (see module doc)."""

    error_factor: float = 4.0
    error_floor: float = 0.1
    rate_margin: float = 0.05
    allow_missing: bool = False
    fail_on_new: bool = False

    def __post_init__(self) -> None:
        if not 1 < self.error_factor < float("inf"):
            raise InputError(f"--error-factor {self.error_factor:g}: must be > 1 and finite "
                             "(e.g. 4 = four times the error)")
        if not 0 <= self.error_floor <= 1:
            raise InputError(f"--error-floor {self.error_floor:g}: a fraction of the case's bound in [0, 1]")
        if not 0 <= self.rate_margin < 1:
            raise InputError(f"--rate-margin {self.rate_margin:g}: a failure-rate difference in [0, 1)")


@dataclass(frozen=True)
class Finding:
    rule: str  # outcome | error | rate | missing | new
    key: str   # case key, or the strategy for the rate rule
    message: str
    regression: bool


@dataclass
class GateResult:
    regressions: list[Finding] = field(default_factory=list)
    improvements: list[Finding] = field(default_factory=list)
    notices: list[Finding] = field(default_factory=list)
    compared: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.regressions else 0

    def add(self, f: Finding, improvement: bool = False) -> None:
        (self.regressions if f.regression else self.improvements if improvement else self.notices).append(f)

    def as_dict(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "compared": self.compared,
                **{k: [asdict(f) for f in getattr(self, k)] for k in ("regressions", "improvements", "notices")}}


def _require_header(header: dict[str, Any], where: str) -> None:
    if not header.get("environment"):
        raise RunFileError(f"{where}: no run.json with an environment, so its device class is unknown; "
                           "pass a directory written by `python -m harness run`")


def check_compatible(baseline: dict[str, Any], header: dict[str, Any], path: str = "baseline") -> None:
    """Refuse a baseline of another device class: numbers of a GPU and a CPU are not comparable."""
    run_class, base_class = device_class(header), baseline.get("device_class")
    if run_class != base_class:
        raise InputError(f"baseline {path} is for device class {base_class!r} but the run is {run_class!r}; "
                         "gate against the baseline of that device class (results/baselines/)")


def _outcome_rule(res: GateResult, key: str, bo: str, r: dict) -> None:
    ro = r["outcome"]
    if bo == ro:
        return
    exp = (r.get("expected") or {}).get("outcome")
    note = " (a declared expected failure)" if exp == ro else ""
    msg = f"{bo} -> {ro}{note}: {r.get('reason', '')}"
    worse = (bo == "pass") or SEVERITY[ro] > SEVERITY[bo]
    better = (ro == "pass") or SEVERITY[ro] < SEVERITY[bo]
    if worse:
        res.add(Finding("outcome", key, msg, True))
    elif better and ro != "unsupported":
        res.add(Finding("outcome", key, msg, False), improvement=True)
    else:
        res.add(Finding("outcome", key, msg, False))


def _error_rule(res: GateResult, key: str, b: BaseCase, r: dict, th: Thresholds) -> None:
    """Error metrics of a case passing in both. Every comparison is written so that NaN cannot slip
    through: NaN compares false both ways, so non-finite values are sorted out before any ``>``."""
    if b.nondeterministic or nondeterministic(r):
        spread = (r.get("reference") or {}).get("fp32_rerun_diff") if nondeterministic(r) else None
        where = "this run" if nondeterministic(r) else "the baseline"
        res.add(Finding("error", key, f"errors not compared: the FP32 reference was nondeterministic in {where}"
                                      + (f" (rerun spread {num(spread):.3g})" if spread is not None else ""), False))
        return
    bound = b.bound if b.bound is not None else num(r.get("bound"))
    floor = th.error_floor * bound if math.isfinite(bound) and bound > 0 else 0.0
    m = r.get("metrics") or {}
    worst: tuple[float, str] | None = None
    best: tuple[float, str] | None = None
    for k in ERROR_METRICS:
        if k not in m or k not in b.metrics:  # a metric this run or the baseline does not have
            continue
        old, new = b.metrics[k], num(m[k])  # null reads as NaN: nothing measured is no improvement
        text = f"{k} {old:.3g} -> {new:.3g}"
        if math.isfinite(old) and not math.isfinite(new):  # finite -> inf/NaN: the worst there is
            worst = (math.inf, f"{text} (a finite error became non-finite)")
        elif not math.isfinite(old):  # inf/NaN -> anything: no ratio to take
            if math.isfinite(new) and best is None:
                best = (0.0, f"{text} (a non-finite error became finite)")
        elif new > th.error_factor * max(old, floor):
            ratio = new / old if old > 0 else math.inf
            if worst is None or ratio > worst[0]:
                worst = (ratio, f"{text} (x{ratio:.3g} > x{th.error_factor:g}; errors below {floor:.2g} = "
                                f"{th.error_floor:g}*bound {bound:.2g} are not compared)")
        elif old > max(floor, th.error_factor * new):
            ratio = new / old
            if best is None or ratio < best[0]:
                best = (ratio, f"{text} (x{ratio:.3g})")
    margin = _margin_text(b, r)
    if worst:
        res.add(Finding("error", key, worst[1] + margin, True))
    elif best:
        res.add(Finding("error", key, best[1] + margin, False), improvement=True)


def _margin_text(b: BaseCase, r: dict) -> str:
    """``; margin 0.12 -> 0.9`` where both the baseline and the record carry a margin (older files lack it)."""
    if b.margin is None or r.get("margin") is None:
        return ""
    return f"; margin {b.margin:.3g} -> {num(r['margin']):.3g}"


class _Rates:
    """Outcome counts per strategy over the cases both the baseline and the run hold."""

    def __init__(self) -> None:
        self.base: dict[str, dict[str, int]] = {}
        self.run: dict[str, dict[str, int]] = {}

    def add(self, strategy: str, bo: str, ro: str) -> None:
        for counts, o in ((self.base, bo), (self.run, ro)):
            c = counts.setdefault(strategy, {})
            c[o] = c.get(o, 0) + 1

    def findings(self, res: GateResult, th: Thresholds) -> None:
        for s in sorted(self.run):
            kb, nb = failure_rate(self.base[s])
            kr, nr = failure_rate(self.run[s])
            if not nb or not nr:
                continue
            pb, pr = kb / nb, kr / nr
            lo, hi = wilson(kr, nr)
            text = (f"failure rate {kb}/{nb} {pct(pb)} -> {kr}/{nr} {pct(pr)} ({100 * (pr - pb):+.1f} points; "
                    f"95% CI of the run {pct(lo)}-{pct(hi)})")
            # exact: 5500/10000 - 500/1000 is 5 points, but 0.55 - 0.5 is 0.050000000000000044 in binary
            rise = Fraction(kr, nr) - Fraction(kb, nb)
            margin = Fraction(repr(th.rate_margin))
            if rise > margin and lo > pb:
                res.add(Finding("rate", s, f"{text}: rose by more than {100 * th.rate_margin:g} points and the "
                                           "interval excludes the baseline's rate", True))
            elif -rise > margin and hi < pb:
                res.add(Finding("rate", s, text, False), improvement=True)


def compare(baseline: dict[str, Any], header: dict[str, Any], records: Iterable[dict[str, Any]],
            th: Thresholds = Thresholds(), where: str = "run") -> GateResult:
    """Every finding of a run against a baseline (see module doc for the rules), reading ``records`` once,
    one at a time; findings are listed by case key, the rate findings last."""
    res = GateResult()
    base = baseline["cases"]
    pending = dict.fromkeys(base)  # baseline cases not yet seen in the run (keys shared, no values)
    new: set[str] = set()
    rates = _Rates()
    for r in records:
        key = case_key(r)
        if key in pending:
            del pending[key]
            b = as_case(base[key])
            res.compared += 1
            _outcome_rule(res, key, b.outcome, r)
            if b.outcome == r["outcome"] == "pass":
                _error_rule(res, key, b, r, th)
            rates.add(r["strategy"], b.outcome, r["outcome"])
        elif key in base or key in new:
            raise RunFileError(f"{where}: two records for {key}; a run holds one record per case and strategy")
        else:
            new.add(key)
            res.add(Finding("new", key, f"not in the baseline ({r['outcome']}); --update the baseline to gate it",
                            th.fail_on_new))
    for key in pending:
        res.add(Finding("missing", key, f"in the baseline ({as_case(base[key]).outcome}), not in this run",
                        not th.allow_missing))
    for items in (res.regressions, res.improvements, res.notices):
        items.sort(key=lambda f: f.key)
    rates.findings(res, th)
    return res


def render(res: GateResult, run_dir: str, baseline_path: str, baseline: dict[str, Any],
           header: dict[str, Any]) -> str:
    """The gate's report: a line on what was compared, the findings grouped, and the verdict."""
    env = baseline.get("environment") or {}
    lines = [f"gate: {run_dir} ({device_class(header)}, status {header.get('status', '?')}) against {baseline_path} "
             f"({len(baseline['cases'])} cases, torch {env.get('torch', '?')}, commit "
             f"{str(env.get('git_commit') or '?')[:10]}): {res.compared} cases compared"]
    for title, items in (("REGRESSIONS", res.regressions), ("improvements", res.improvements),
                         ("notices", res.notices)):
        if items:
            lines.append(f"{title} ({len(items)})")
            lines += [f"  {f.rule:8s} {f.key}: {f.message}" for f in items]
    verdict = "FAIL" if res.regressions else "ok"
    lines.append(f"gate {verdict}: {len(res.regressions)} regressions, {len(res.improvements)} improvements, "
                 f"{len(res.notices)} notices")
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------------
def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def add_command(sub: Any) -> None:
    """``gate DIR --baseline FILE [--update] [thresholds]`` (see module doc)."""
    d = Thresholds()
    g = sub.add_parser("gate", help="compare a run with a baseline: exit 0 no regression, 1 regression, 2 bad input, "
                                           "3 internal error")
    g.set_defaults(func=_cmd_gate)
    g.add_argument("run_dir", metavar="DIR", type=Path)
    g.add_argument("--baseline", required=True, type=Path, metavar="FILE")
    g.add_argument("--update", action="store_true", help="write the baseline from this run and exit 0")
    g.add_argument("--error-factor", type=_fraction, default=d.error_factor, metavar="X",
                   help=f"a passing case's error may grow by this factor (default {d.error_factor:g})")
    g.add_argument("--error-floor", type=_fraction, default=d.error_floor, metavar="F",
                   help=f"errors below F times the case's bound are not compared (default {d.error_floor:g})")
    g.add_argument("--rate-margin", type=_fraction, default=d.rate_margin, metavar="M",
                   help=f"a strategy's failure rate may rise by M (default {d.rate_margin:g} = 5 points)")
    g.add_argument("--allow-missing", action="store_true", help="cases missing from the run are not regressions")
    g.add_argument("--fail-on-new", action="store_true", help="cases not in the baseline are regressions")
    g.add_argument("--json", action="store_true", help="print the findings as JSON")


def _cmd_gate(args: argparse.Namespace) -> int:
    th = Thresholds(args.error_factor, args.error_floor, args.rate_margin, args.allow_missing, args.fail_on_new)
    header = read_header(args.run_dir)
    _require_header(header, str(args.run_dir))
    records = RunRecords(args.run_dir)
    if args.update:
        if header.get("status") != "complete":
            raise InputError(f"{args.run_dir}: run status is {header.get('status')!r}, not 'complete'; "
                             "a baseline is made from a whole run")
        if args.baseline.is_dir():
            raise InputError(f"--baseline {args.baseline} is a directory; pass a file name such as "
                             f"{args.baseline / 'cpu.json'}")
        n = write_baseline(args.baseline, header, records, source=args.run_dir.name)
        print(f"baseline {args.baseline}: {n} cases, device class {device_class(header)}")
        return 0
    base = load_baseline(args.baseline)
    check_compatible(base, header, str(args.baseline))
    res = compare(base, header, records, th, where=str(args.run_dir))
    if args.json:
        print(json.dumps(res.as_dict(), indent=1))
    else:
        print(render(res, str(args.run_dir), str(args.baseline), base, header))
    return res.exit_code
