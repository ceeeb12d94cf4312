"""``check-model MODULE:FACTORY --fix``: for each strategy that failed, the cheapest verified change that
makes it pass.

:func:`fix_model` takes what :func:`harness.models.model_check.check_model` found (records, diagnoses, the
FP16 loss-scale window), searches each failing strategy's candidates
(:mod:`harness.models.fix_search`: loss scaler, modules kept in higher precision, weight update, format;
cheapest first, each run and judged by the engine against the model's reference), then re-runs the plan
found in a run of its own, as ``check-model`` runs a strategy (``<run dir>/fix/<strategy>/``, the same
scenario, reference and judge). Only a plan whose re-run passes is printed as a fix, with its snippet
(:func:`harness.models.plan.snippet`) and its step time against the failing strategy and BF16; otherwise
the report says ``no verified fix found`` and lists what was tried. ``fix.json`` in the run directory (and
``--plan-out FILE``) holds every plan, verdict and attempt.

>>> result = check_model("examples.third_party_model:factory", steps=8)  # doctest: +SKIP
>>> print(fix_model("examples.third_party_model:factory", result).report())  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..core.strategy import Strategy, parse
from ..results import read_run, write_json_atomic
from ..run.engine import RunConfig, resolve_device, run_matrix
from ..run.supervisor import fork_usable
from ..run.worker import IsolatedFailure, isolated
from .fix_search import SearchResult, plan_scenario, search
from .model_check import CheckResult
from .model_isolation import stand_in
from .plan import Plan, snippet
from .user_model import _sanitize, load_spec, model_scenario, target_module

__all__ = ["Fix", "FixReport", "fix_model", "DEFAULT_BUDGET"]

#: Attempts the report lists for a verified plan (fix.json lists all).
TRIED_SHOWN = 8

#: Training runs one strategy's search may spend (the verification re-run not counted).
DEFAULT_BUDGET = 40


@dataclass
class Fix:
    """The outcome of ``--fix`` for one failing strategy: a verified plan, or None and why."""

    strategy: str
    outcome: str  # the failing verdict
    plan: Plan | None = None
    record: dict[str, Any] | None = None  # the verification re-run's record
    run_dir: str | None = None
    tried: list[str] = field(default_factory=list)
    seconds: dict[str, float | None] = field(default_factory=dict)  # per training attempt: plan, failing, bf16
    why_none: str = ""
    device: str = "cpu"

    @property
    def verified(self) -> bool:
        return self.plan is not None and self.record is not None and self.record["outcome"] == "pass"

    def lines(self) -> list[str]:
        """What ``--fix`` prints for this strategy."""
        head = f"fix for {self.strategy} ({self.outcome}): "
        if not self.verified:
            tried = "; ".join(_shown(self.tried)) or "nothing"
            return [head + f"no verified fix found{f' ({self.why_none})' if self.why_none else ''}; tried: {tried}"]
        assert self.plan is not None and self.record is not None
        margin = self.record.get("margin")
        out = [head + f"{self.plan.describe()} -> {self.record['outcome']} on re-run"
               + (f" (margin {float(margin):.2g})" if margin is not None else "") + f" [{self.run_dir}]"]
        out += [f"  because: {n}" for n in self.plan.notes]
        out.append(f"  step time here (training only, {self.device}): " + _speed(self.seconds, self.strategy))
        out.append(f"  tried ({len(self.tried)}): " + "; ".join(_shown(self.tried)))
        out.append("  apply it:")
        out += [f"    {line}" for line in snippet(self.plan, "cuda" if self.device == "cuda" else "cpu").splitlines()]
        return out

    def as_dict(self) -> dict[str, Any]:
        rec = self.record or {}
        return {"strategy": self.strategy, "outcome": self.outcome, "verified": self.verified,
                "plan": self.plan.as_dict() if self.plan else None,
                "verdict": {k: rec.get(k) for k in ("outcome", "reason", "margin", "bound")} if rec else None,
                "run_dir": self.run_dir, "seconds_per_step": self.seconds, "tried": self.tried,
                "why_none": self.why_none,
                "snippet": snippet(self.plan, "cuda" if self.device == "cuda" else "cpu") if self.verified else None}


def _shown(tried: list[str]) -> list[str]:
    """The first :data:`TRIED_SHOWN` attempts and the last (what ended the search), the count of the rest."""
    if len(tried) <= TRIED_SHOWN + 1:
        return tried
    return tried[:TRIED_SHOWN] + [f"... {len(tried) - TRIED_SHOWN - 1} more in fix.json ...", tried[-1]]


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.3g} ms"


def _speed(sec: dict[str, float | None], label: str) -> str:
    plan, failing, bf16 = sec.get("plan"), sec.get("failing"), sec.get("bf16")
    parts = [f"plan {_ms(plan)}", f"{label} {_ms(failing)}" + (f" (plan x{plan / failing:.2f})" if plan and failing
                                                                   else "")]
    if bf16 is not None and label != "bf16":
        parts.append(f"bf16 {_ms(bf16)}" + (f" (plan x{plan / bf16:.2f})" if plan else ""))
    return ", ".join(parts) + " per step"


@dataclass
class FixReport:
    """Every failing strategy's :class:`Fix` for one model."""

    model: str
    steps: int
    device: str
    fixes: list[Fix]

    def report(self) -> str:
        if not self.fixes:
            return "--fix: every strategy passed (or is unsupported here): nothing to fix"
        return "\n".join(line for f in self.fixes for line in f.lines())

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "steps": self.steps, "device": self.device,
                "fixes": {f.strategy: f.as_dict() for f in self.fixes}}


def _run(fn: Any, args: tuple, device: torch.device, timeout: float | None) -> Any:
    """``fn(*args)`` in a forked process under ``timeout`` where forking works, else here."""
    if fork_usable(device)[0]:
        return isolated(fn, args, timeout)
    return fn(*args)


def _new_dir(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``... where an earlier ``--fix`` of the same run already wrote one."""
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def _plan_scenarios(target: Any, steps: int, plan: Plan, seed: int) -> dict[str, Any]:
    s = plan_scenario(model_scenario(load_spec(target, seed=seed), steps), plan)
    return {s.name: s}


def _verify(target: Any, plan: Plan, result: CheckResult, device: torch.device, timeout: float | None
            ) -> tuple[dict[str, Any], str, float | None]:
    """The plan run as ``check-model`` runs a strategy, in a run directory of its own: (record, directory,
    seconds per training attempt in it)."""
    out = _new_dir(result.out / "fix" / _sanitize(plan.fixes))
    imports = [target_module(target)] if isinstance(target, str) else []
    cfg = RunConfig([stand_in(result.name, result.steps, result.seed)], [plan.strategy], device, out=out,
                    imports=imports, timeout=timeout, workers=1)
    out_dir, summary, _ = run_matrix(cfg, None, init=partial(_plan_scenarios, target, result.steps, plan,
                                                             result.seed))
    _, records = read_run(out_dir)
    attempts = (records[0].get("metrics") or {}).get("attempts")
    return records[0], str(out_dir), summary.seconds_in_scenarios / attempts if attempts else None


def _fix_one(target: Any, strategy: Strategy, original: dict[str, Any], result: CheckResult, device: torch.device,
             timeout: float | None, budget: int) -> Fix:
    fix = Fix(strategy.label, original["outcome"], device=device.type)
    limit = None if not timeout else timeout * (budget + 2)  # each run has the --timeout a step has
    try:
        found: SearchResult = _run(search, (target, strategy, device, result.steps, result.window,
                                            result.diagnoses.get(strategy.label), budget, timeout, original,
                                            result.seed), device, limit)
    except IsolatedFailure as exc:
        fix.why_none = f"the search failed: {exc}"
        return fix
    fix.tried, fix.seconds = found.tried, found.seconds
    if found.plan is None:
        return fix
    record, fix.run_dir, seconds = _verify(target, found.plan, result, device, timeout)
    fix.seconds["plan"] = seconds if seconds is not None else fix.seconds["plan"]  # the re-run's own
    if record["outcome"] != "pass":
        fix.why_none = (f"{found.plan.describe()} passed in the search but its re-run gave {record['outcome']}: "
                        f"{record['reason'][:200]}")
        return fix
    fix.plan, fix.record = found.plan, record
    return fix


def fix_model(target: Any, result: CheckResult, device: str = "auto", timeout: float | None = 600.0,
              budget: int = DEFAULT_BUDGET, plan_out: Path | str | None = None) -> FixReport:
    """A verified plan, or the attempts, for each strategy of ``result`` that failed (``error`` records
    excepted: their traceback is the finding). Writes ``fix.json`` next to the run's records, and to
    ``plan_out`` when given. ``target`` is what ``check_model`` was given."""
    if budget < 1:
        raise ValueError(f"the fix search budget must be >= 1 training run, got {budget}")
    dev = resolve_device(device)
    fixes = []
    for r in result.records:
        if r["outcome"] in ("pass", "unsupported", "error"):
            continue
        strategy = parse(r["strategy_spec"]).with_name(r["strategy"])
        fixes.append(_fix_one(target, strategy, r, result, dev, timeout, budget))
    rep = FixReport(result.name, result.steps, dev.type, fixes)
    write_json_atomic(result.out / "fix.json", rep.as_dict())
    if plan_out is not None:
        write_json_atomic(Path(plan_out), rep.as_dict())
    return rep


def add_arguments(p: Any) -> None:
    """``--fix``, ``--plan-out FILE`` and ``--fix-budget N`` on the ``check-model`` parser."""
    from ..cli import positive_int
    p.add_argument("--fix", action="store_true", help="for each failing strategy, search for the cheapest change "
                   "that makes it pass (loss scaler, modules kept in FP32/BF16, weight update, format), re-run "
                   "it and print it only if it passes; plans in <run dir>/fix.json")
    p.add_argument("--plan-out", type=Path, default=None, metavar="FILE", help="also write the plans (JSON) here")
    p.add_argument("--fix-budget", type=positive_int, default=DEFAULT_BUDGET, metavar="N",
                   help=f"training runs one strategy's search may spend (default {DEFAULT_BUDGET})")


def check_arguments(args: Any) -> None:
    """Bad ``--fix`` arguments, refused before anything runs (ValueError: one line, exit 2)."""
    if args.plan_out is not None:
        if not args.fix:
            raise ValueError("--plan-out writes the plans --fix finds; add --fix, or drop --plan-out")
        parent = Path(args.plan_out).parent
        if Path(args.plan_out).is_dir() or not parent.is_dir():
            raise ValueError(f"--plan-out {args.plan_out}: pass a file in an existing directory, e.g. "
                             "--plan-out plan.json")


def run_fix(args: Any, result: CheckResult) -> FixReport:
    """``--fix`` after ``check-model`` printed its report: search, verify, print, write the plans."""
    rep = fix_model(args.target, result, args.device, args.timeout or None, args.fix_budget, args.plan_out)
    print(rep.report())
    return rep
