"""The regression gate: a run against a committed baseline, for CI.

A **baseline** is one JSON file: the schema version, the device class (:func:`harness.results.device_class`),
the environment it was made in, and per case key ``case#seed|strategy`` the outcome, the key error
metrics (``rel_err``, ``grad_rel_err``, ``loss_divergence``, 4 significant digits) and the bound.

Rules, each finding naming the case (or strategy) and the numbers:

* **outcome** - a case got worse: ``pass`` to anything else, or a failure to a more severe one
  (:data:`harness.results.SEVERITY`); the reverse is an improvement;
* **error** - a case passing in both grew an error metric by more than ``error_factor``; errors below
  ``error_floor`` times the case's bound are not compared (a 1000x growth of 1e-10 is noise), nor are
  the errors of a case whose FP32 reference was nondeterministic in either run (GPU kernels that add in
  another order each run, :mod:`harness.reference`): that is a notice, while its outcome is still gated;
* **rate** - a strategy's failure rate rose by more than ``rate_margin`` *and* the run's 95% Wilson
  interval lies above the baseline's rate, so a case or two flipping in a large sample does not trip it;
* **missing** / **new** - cases in only one of the two (missing is a regression unless allowed; new
  cases are listed, and fail the gate only with ``fail_on_new``).

Exit codes of ``python -m harness gate``: 0 nothing got worse, 1 a regression, 2 bad input. The gate
imports only :mod:`harness.results` and the pure :mod:`harness.report.tables`: it is a pure function of
run files, and runs on a laptop with runs copied from a GPU box.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .report.tables import counts_from_records, failure_rate, pct, wilson
from .results import ERROR_METRICS, SCHEMA_VERSION, SEVERITY, RunFileError, case_key, device_class, num, read_run, write_json_atomic

__all__ = ["Thresholds", "Finding", "GateResult", "make_baseline", "load_baseline", "check_compatible",
           "compare", "render", "add_command", "ERROR_METRICS", "BASELINE_KIND"]

BASELINE_KIND = "mp-harness baseline"
UPDATE_HINT = "python -m harness gate RUN_DIR --baseline {path} --update"


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
            raise ValueError(f"--error-factor {self.error_factor:g}: must be > 1 and finite "
                             "(e.g. 4 = four times the error)")
        if not 0 <= self.error_floor <= 1:
            raise ValueError(f"--error-floor {self.error_floor:g}: a fraction of the case's bound in [0, 1]")
        if not 0 <= self.rate_margin < 1:
            raise ValueError(f"--rate-margin {self.rate_margin:g}: a failure-rate difference in [0, 1)")


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


def _sig(x: Any) -> Any:
    """4 significant digits: baselines stay stable across CPUs whose last bits differ."""
    v = num(x)
    return float(f"{v:.4g}") if v == v and abs(v) != float("inf") else x


def _require_header(header: dict[str, Any], where: str) -> None:
    if not header.get("environment"):
        raise RunFileError(f"{where}: no run.json with an environment, so its device class is unknown; "
                           "pass a directory written by `python -m harness run`")


def _by_key(records: list[dict[str, Any]], where: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        k = case_key(r)
        if k in out:
            raise RunFileError(f"{where}: two records for {k}; a run holds one record per case and strategy")
        out[k] = r
    return out


def make_baseline(header: dict[str, Any], records: list[dict[str, Any]], source: str = "") -> dict[str, Any]:
    """The baseline of a run (see module doc); ``source`` names the run it was made from."""
    cases = {}
    for key, r in sorted(_by_key(records, source or "run").items()):
        m = r.get("metrics") or {}
        cases[key] = {"scenario": r.get("scenario"), "family": r.get("family"), "strategy": r.get("strategy"),
                      "outcome": r.get("outcome"), "bound": _sig(r["bound"]) if r.get("bound") is not None else None,
                      "metrics": {k: _sig(m[k]) for k in ERROR_METRICS if k in m}}
        if _nondeterministic(r):
            cases[key]["nondeterministic"] = True
    cfg = header.get("config", {})
    return {"kind": BASELINE_KIND, "schema_version": SCHEMA_VERSION, "device_class": device_class(header),
            "environment": header.get("environment", {}), "created": header.get("created"), "source_run": source,
            "tier": cfg.get("tier"), "seeds": cfg.get("seeds"), "cases": cases}


def load_baseline(path: Path | str) -> dict[str, Any]:
    """Read and check a baseline file; raises ValueError with one line naming the fix."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"baseline {p} is a directory; pass the baseline's JSON file, e.g. results/baselines/cpu.json")
    if not p.is_file():
        raise ValueError(f"baseline {p} does not exist; write one with `{UPDATE_HINT.format(path=p)}`")
    try:
        b = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"baseline {p}: unreadable ({exc}); regenerate it with `{UPDATE_HINT.format(path=p)}`") from None
    if not isinstance(b, dict) or b.get("kind") != BASELINE_KIND or not isinstance(b.get("cases"), dict):
        raise ValueError(f"{p} is not a harness baseline (expected kind {BASELINE_KIND!r} and a 'cases' object)")
    if b.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"baseline {p} has schema version {b.get('schema_version')}, this harness writes "
                         f"{SCHEMA_VERSION}; regenerate it with `{UPDATE_HINT.format(path=p)}`")
    return b


def check_compatible(baseline: dict[str, Any], header: dict[str, Any], path: str = "baseline") -> None:
    """Refuse a baseline of another device class: numbers of a GPU and a CPU are not comparable."""
    run_class, base_class = device_class(header), baseline.get("device_class")
    if run_class != base_class:
        raise ValueError(f"baseline {path} is for device class {base_class!r} but the run is {run_class!r}; "
                         "gate against the baseline of that device class (results/baselines/)")


def _outcome_rule(res: GateResult, key: str, b: dict, r: dict) -> None:
    bo, ro = b["outcome"], r["outcome"]
    if bo == ro:
        return
    exp = (r.get("expected") or {}).get("outcome")
    note = " (a declared expected failure)" if exp == ro else ""
    msg = f"{bo} -> {ro}{note}: {r.get('reason', '')}"
    worse = (bo == "pass") or SEVERITY.get(ro, 99) > SEVERITY.get(bo, 99)
    better = (ro == "pass") or SEVERITY.get(ro, 99) < SEVERITY.get(bo, 99)
    if worse:
        res.add(Finding("outcome", key, msg, True))
    elif better and ro != "unsupported":
        res.add(Finding("outcome", key, msg, False), improvement=True)
    else:
        res.add(Finding("outcome", key, msg, False))


def _nondeterministic(r: dict[str, Any]) -> bool:
    """Whether a record's (or a baseline case's) FP32 reference differed between two runs of itself."""
    return bool(r.get("nondeterministic") or (r.get("reference") or {}).get("nondeterministic"))


def _error_rule(res: GateResult, key: str, b: dict, r: dict, th: Thresholds) -> None:
    if _nondeterministic(b) or _nondeterministic(r):
        spread = (r.get("reference") or {}).get("fp32_rerun_diff") if _nondeterministic(r) else None
        where = "this run" if _nondeterministic(r) else "the baseline"
        res.add(Finding("error", key, f"errors not compared: the FP32 reference was nondeterministic in {where}"
                                      + (f" (rerun spread {num(spread):.3g})" if spread is not None else ""), False))
        return
    bound = num(b.get("bound") if b.get("bound") is not None else r.get("bound"))
    floor = th.error_floor * bound if bound == bound else 0.0
    m = r.get("metrics") or {}
    worst: tuple[float, str] | None = None
    best: tuple[float, str] | None = None
    for k in ERROR_METRICS:
        if k not in m or k not in b["metrics"]:
            continue
        old, new = num(b["metrics"][k]), num(m[k])
        text = f"{k} {old:.3g} -> {new:.3g}"
        if new > th.error_factor * max(old, floor):
            ratio = new / old if old > 0 else float("inf")
            if worst is None or ratio > worst[0]:
                worst = (ratio, f"{text} (x{ratio:.3g} > x{th.error_factor:g}; errors below {floor:.2g} = "
                                f"{th.error_floor:g}*bound {bound:.2g} are not compared)")
        elif old > max(floor, th.error_factor * new):
            ratio = new / old
            if best is None or ratio < best[0]:
                best = (ratio, f"{text} (x{ratio:.3g})")
    if worst:
        res.add(Finding("error", key, worst[1], True))
    elif best:
        res.add(Finding("error", key, best[1], False), improvement=True)


def _rate_rule(res: GateResult, base_cases: dict, records: list[dict], th: Thresholds) -> None:
    base_counts, _ = counts_from_records(base_cases.values())
    run_counts, _ = counts_from_records(records)
    for s in sorted(set(base_counts) & set(run_counts)):
        kb, nb = failure_rate(base_counts[s])
        kr, nr = failure_rate(run_counts[s])
        if not nb or not nr:
            continue
        pb, pr = kb / nb, kr / nr
        lo, hi = wilson(kr, nr)
        text = (f"failure rate {kb}/{nb} {pct(pb)} -> {kr}/{nr} {pct(pr)} ({100 * (pr - pb):+.1f} points; "
                f"95% CI of the run {pct(lo)}-{pct(hi)})")
        if pr - pb > th.rate_margin and lo > pb:
            res.add(Finding("rate", s, f"{text}: rose by more than {100 * th.rate_margin:g} points and the "
                                       "interval excludes the baseline's rate", True))
        elif pb - pr > th.rate_margin and hi < pb:
            res.add(Finding("rate", s, text, False), improvement=True)


def compare(baseline: dict[str, Any], header: dict[str, Any], records: list[dict[str, Any]],
            th: Thresholds = Thresholds()) -> GateResult:
    """Every finding of a run against a baseline (see module doc for the rules)."""
    res = GateResult()
    run = _by_key(records, "run")
    base = baseline["cases"]
    for key in sorted(set(base) | set(run)):
        b, r = base.get(key), run.get(key)
        if r is None:
            res.add(Finding("missing", key, f"in the baseline ({b['outcome']}), not in this run",
                            not th.allow_missing))
        elif b is None:
            res.add(Finding("new", key, f"not in the baseline ({r['outcome']}); --update the baseline to gate it",
                            th.fail_on_new))
        else:
            res.compared += 1
            _outcome_rule(res, key, b, r)
            if b["outcome"] == r["outcome"] == "pass":
                _error_rule(res, key, b, r, th)
    _rate_rule(res, base, records, th)
    return res


def render(res: GateResult, run_dir: str, baseline_path: str, baseline: dict[str, Any],
           header: dict[str, Any]) -> str:
    """The gate's report: a line on what was compared, the findings grouped, and the verdict."""
    env = baseline.get("environment", {})
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
    g = sub.add_parser("gate", help="compare a run with a baseline: exit 0 no regression, 1 regression, 2 bad input")
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
    header, records = read_run(args.run_dir)
    _require_header(header, str(args.run_dir))
    if args.update:
        if header.get("status") != "complete":
            raise ValueError(f"{args.run_dir}: run status is {header.get('status')!r}, not 'complete'; "
                             "a baseline is made from a whole run")
        if args.baseline.is_dir():
            raise ValueError(f"--baseline {args.baseline} is a directory; pass a file name such as "
                             f"{args.baseline / 'cpu.json'}")
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        base = make_baseline(header, records, source=args.run_dir.name)
        write_json_atomic(args.baseline, base)
        print(f"baseline {args.baseline}: {len(base['cases'])} cases, device class {base['device_class']}")
        return 0
    base = load_baseline(args.baseline)
    check_compatible(base, header, str(args.baseline))
    res = compare(base, header, records, th)
    if args.json:
        print(json.dumps(res.as_dict(), indent=1))
    else:
        print(render(res, str(args.run_dir), str(args.baseline), base, header))
    return res.exit_code
