"""The search behind ``check-model --fix``: candidate plans for one failing strategy, cheapest first, each
run and judged by the engine's own :func:`harness.run.engine.run_case` against the model's reference
(computed once, shared by every attempt), and the set of modules kept in higher precision shrunk by
delta debugging.

Order (:data:`harness.models.plan.CHANGES`):

1. ``scaler`` (FP16 only): loss scales from the FP16 window of the FP32 gradients
   (:mod:`harness.judge.window`): the scaler started at the power of two in the middle of the window, then
   a dynamic scaler held inside it (floor and cap at its ends). An empty window rules them out, and says so.
2. ``keep``: modules kept in FP32 (BF16 for FP8 recipes), starting from the diagnosis (the first module
   whose output or gradient went non-finite, the modules of the tensors that pull the window apart or
   lost gradients or updates; for FP8 recipes the layers whose per-tensor scaling flushes an operand,
   :mod:`harness.models.fp8_saturation`) or, where keeping those does not pass, from the top of the module
   tree (for FP8 recipes, every routed layer); ``ddmin`` and a walk down the tree
   (:mod:`harness.models.fix_keep`) shrink it to a set from which no module can be dropped. Keeping every
   parameter (every FP8 layer) is the higher precision itself, never a plan; under a casting strategy a set
   holding more than half the parameters is taken only where no weight-update or format change passes.
3. ``optimizer`` (FP16/BF16 parameters without master weights): stochastically rounded updates,
   Kahan-compensated updates, FP32 master weights; those the harness cannot run here are listed, not run.
4. ``format`` (FP16 only): BF16 instead of FP16 for the whole model, without a loss scaler.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import torch

from ..core.execution import Execution, is_kept
from ..core.keep import with_tied
from ..core.scaling import SCALER_PRESETS, ScalerSpec
from ..core.scenario import Case, Scenario
from ..core.strategy import PRESETS, Strategy
from ..judge.window import Window
from ..run.engine import case_inputs, run_case
from ..run.reference import ReferenceCache
from .diagnose import ROOT, Diagnosis
from .fix_keep import callable_children, covers_all, ddmin, gemm_layers, param_share, refine
from .fp8_saturation import saturated_layers
from .plan import Plan
from .recommend import window_sentence
from .user_model import load_spec, model_scenario

__all__ = ["plan_scenario", "search", "SearchResult", "OutOfRuns"]


class OutOfRuns(Exception):
    """The search spent its budget of training runs."""


def plan_scenario(base: Scenario, plan: Plan) -> Scenario:
    """``base`` (the model's training scenario) run with ``plan``'s modules kept in higher precision. Its
    FP32 and FP64 runs are ``base``'s own (:meth:`Execution.keeping` keeps nothing there): the same reference."""
    if not plan.keep_high_precision:
        return base
    keep, fmt = plan.keep_high_precision, plan.keep_format
    return replace(base, run=lambda ex, inputs, p: base.run(ex.keeping(keep, fmt), inputs, p))


class SearchResult:
    """What :func:`search` found: the first plan that passed (or None), one line per attempt, the step
    times measured (seconds per training attempt: the plan's, the failing strategy's, BF16's)."""

    def __init__(self) -> None:
        self.plan: Plan | None = None
        self.tried: list[str] = []
        self.seconds: dict[str, float | None] = {"plan": None, "failing": None, "bf16": None}
        self.failing_outcome = ""
        self.failing_reason = ""


def _step_seconds(rec: dict[str, Any], inner: float) -> float | None:
    attempts = (rec.get("metrics") or {}).get("attempts")
    return inner / attempts if attempts else None


def _owner(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def _suspects(diag: Diagnosis | None, window: Window, strategy: Strategy, model: torch.nn.Module) -> list[str]:
    """Modules the diagnosis and the window point at, in the model's order: the first module whose output
    or gradient went non-finite (its parent where its inputs already were: the code between modules that
    made them runs in the parent's forward), the owners of the tensors that lost gradients or updates,
    and of the two tensors that pull an empty FP16 window apart. For FP8 recipes, the GEMM layers in them."""
    names: set[str] = set()
    if diag is not None:
        for ev in (diag.forward, diag.backward):
            if ev is not None and ev.module != ROOT:
                names.add(_owner(ev.module) if ev.cause == "inputs" else ev.module)
        ranked = sorted(diag.underflow.items(), key=lambda kv: -kv[1])[:8]
        names.update(_owner(p) for p, _ in ranked)
        lost = getattr(diag, "lost_updates", None) or {}  # per-tensor absorbed updates, where the diagnosis has them
        names.update(_owner(p) for p, _ in sorted(lost.items(), key=lambda kv: -kv[1])[:8])
    if strategy.compute == "fp16" and window.empty:
        names.update(_owner(t) for t in (window.lo_tensor, window.hi_tensor) if t)
    names.discard("")
    if strategy.compute in ("fp8", "fp4"):  # only routed layers can be kept out of FP8
        return [n for n in gemm_layers(model) if is_kept(n, tuple(names))]
    return [n for n, _ in model.named_modules() if n in names and not is_kept(n, tuple(names - {n}))]


def _scalers(strategy: Strategy, window: Window) -> tuple[list[Strategy], str]:
    """Scaler candidates from the FP16 window, and the window in words (their reason)."""
    why = f"FP16 loss-scale window of the FP32 gradients: {window_sentence(window)}"
    lo2, hi2 = window.pow2
    if window.empty or lo2 is None or hi2 is None:
        return [], why
    mid = math.ldexp(1.0, round((math.log2(lo2) + math.log2(hi2)) / 2))
    sc = strategy.scaler
    if sc.kind == "static":
        out = [replace(sc, init=mid)]
    elif sc.kind == "gradscaler":
        out = [replace(sc, init=mid)]
    else:
        base = sc if sc.kind == "dynamic" else SCALER_PRESETS["torch"]
        out = [replace(base, init=mid, min=min(base.min, mid), max=max(base.max, mid))]
    if sc.kind != "static":
        d = SCALER_PRESETS["torch"] if sc.kind != "dynamic" else sc
        out.append(replace(d, kind="dynamic", init=mid, min=lo2, max=hi2))
    cands = [replace(strategy, scaler=s, name="") for s in out if s != sc]
    return list(dict.fromkeys(cands)), why


def _window_scalers(strategy: Strategy, window: Window) -> tuple[list[Strategy], str]:
    """:func:`_scalers`, or none where the window's scales are past what a scaler holds (FP32's range)."""
    try:
        return _scalers(strategy, window)
    except ValueError as exc:  # a window reaching past 2^127: no scaler spec can hold its scales
        return [], f"{window_sentence(window)}; no scaler holds those scales ({exc})"


def _updates(strategy: Strategy) -> list[Strategy]:
    s = replace(strategy, name="")
    if s.params not in ("fp16", "bf16") or s.master:
        return []
    out = [replace(s, update=u) for u in ("sr", "kahan") if s.update != u]
    scaler = s.scaler if s.scaler.kind != "gradscaler" else replace(s.scaler, kind="dynamic")
    return out + [replace(s, master=True, update="nearest", scaler=scaler)]


def _formats(strategy: Strategy) -> list[Strategy]:
    if strategy.compute != "fp16":
        return []
    params = "bf16" if strategy.params == "fp16" else strategy.params
    return [replace(strategy, compute="bf16", params=params, scaler=ScalerSpec(), name="")]


class _Runner:
    """Runs plans through the engine against one shared reference; counts runs against a budget."""

    def __init__(self, target: Any, steps: int, device: torch.device, timeout: float | None, budget: int,
                 seed: int = 0) -> None:
        self.spec = spec = load_spec(target, seed=seed)
        self.model = spec.model
        self.base = model_scenario(spec, steps)
        # check-model's one case: the one value of each grid key, run seed 0 (one --seeds)
        self.case = Case(self.base, {k: v[0] for k, v in self.base.grid.items()}, 0)
        self.device, self.timeout, self.budget, self.runs = device, timeout, budget, 0
        self.inputs, _ = case_inputs(self.case, device)
        self.refs = ReferenceCache()

    def run(self, strategy: Strategy, plan: Plan | None = None, reserve: int = 0) -> tuple[dict[str, Any], float]:
        """One run of ``strategy`` (with ``plan``'s modules kept) judged by the engine; OutOfRuns where the
        budget, less ``reserve`` runs kept for later candidates, is spent."""
        if self.runs >= self.budget - reserve:
            raise OutOfRuns(f"the search budget of {self.budget} training runs is spent"
                            + (f" (less {reserve} kept for the changes after this one)" if reserve else ""))
        self.runs += 1
        sc = plan_scenario(self.base, plan) if plan is not None else self.base
        return run_case(Case(sc, self.case.params, self.case.seed), strategy, self.device, self.inputs, self.refs,
                        self.timeout)


def _line(plan: Plan, rec: dict[str, Any]) -> str:
    return f"{plan.describe()} -> {rec['outcome']}" + ("" if rec["outcome"] == "pass" else f" ({rec['reason'][:160]})")


def search(target: Any, strategy: Strategy, device: torch.device, steps: int, window: Window,
           diag: Diagnosis | None, budget: int = 40, timeout: float | None = None,
           original: dict[str, Any] | None = None, seed: int = 0) -> SearchResult:
    """The cheapest plan that passes for ``strategy`` (see module doc); every attempt is listed.

    ``original`` is check-model's record of ``strategy``: the search first runs the strategy again and
    stops where its reference (the FP32 loss curve's last value) is not that record's, since then the
    factory built another model here (weights drawn from an unseeded global RNG) and no plan would be
    for the model that was checked. ``seed`` is check-model's ``--seed``."""
    r, res = _Runner(target, steps, device, timeout, budget, seed), SearchResult()
    rec, inner = r.run(strategy)
    res.failing_outcome, res.seconds["failing"] = rec["outcome"], _step_seconds(rec, inner)
    res.failing_reason = f"{strategy.label}: {rec['outcome']}: {rec['reason']}"
    want = ((original or {}).get("metrics") or {}).get("final_loss_ref")
    got = (rec.get("metrics") or {}).get("final_loss_ref")
    if want is not None and got != want:
        res.tried.append(f"not searched: the factory built another model here (FP32's final loss {got!r}, "
                         f"check-model's {want!r}): the factory draws from a random source check-model's "
                         "--seed does not set; make every call build the same model")
        return res
    if rec["outcome"] == "pass":
        res.tried.append(f"{strategy.label} passed when run again here: its failure did not reproduce")
        return res
    bf16 = PRESETS["bf16"]
    if str(strategy) == str(bf16):
        res.seconds["bf16"] = res.seconds["failing"]
    elif Execution(bf16, device).supported:
        brec, binner = r.run(bf16)
        res.seconds["bf16"] = _step_seconds(brec, binner)
    try:
        _search(r, res, strategy, window, diag)
    except OutOfRuns as exc:
        res.tried.append(str(exc))
    return res


def _attempt(r: _Runner, res: SearchResult, plan: Plan) -> bool:
    if not Execution(plan.strategy, r.device).supported:
        res.tried.append(f"{plan.describe()}: not run ({Execution(plan.strategy, r.device).unsupported_reason})")
        return False
    rec, inner = r.run(plan.strategy, plan)
    res.tried.append(_line(plan, rec))
    if rec["outcome"] == "pass":
        res.plan, res.seconds["plan"] = plan, _step_seconds(rec, inner)
        return True
    return False


def _search(r: _Runner, res: SearchResult, strategy: Strategy, window: Window, diag: Diagnosis | None) -> None:
    def mk(s: Strategy, change: str, notes: Any = (), keep: Any = (), fmt: str = "fp32") -> Plan:
        return Plan(str(replace(s, name="")), tuple(keep), fmt, tuple(notes), strategy.label, change)

    forward = diag.forward if diag is not None and diag.forward is not None else None
    if strategy.compute == "fp16" and forward is not None and forward.cause == "overflow":
        res.tried.append(f"loss scaler: not tried: the forward pass overflows at `{forward.module}`, which no loss "
                         "scale changes")
    elif strategy.compute == "fp16":
        cands, why = _window_scalers(strategy, window)
        if not cands:
            res.tried.append(f"loss scaler: none to try ({why})")
        for s in cands:
            if _attempt(r, res, mk(s, "scaler", [why])):
                return
    later = [s for s in _updates(strategy) + _formats(strategy) if Execution(s, r.device).supported]
    deferred = _keep(r, res, strategy, window, diag, mk, len(later))
    if deferred is not None:
        share = param_share(r.model, deferred[0].keep_high_precision)
        if strategy.apply != "cast" or share <= MAX_KEPT_SHARE:
            res.plan, res.seconds["plan"] = deferred
            return
        res.tried.append(f"that plan keeps {100 * share:.3g}% of the parameters in FP32: a weight update or format "
                         "change is tried first, and it stands only if neither passes")
    for s in _updates(strategy):
        if _attempt(r, res, mk(s, "optimizer", [res.failing_reason])):
            return
    for s in _formats(strategy):
        why = f"FP16 loss-scale window of the FP32 gradients: {window_sentence(window)}"
        if _attempt(r, res, mk(s, "format", [res.failing_reason, why])):
            return
    if deferred is not None:
        res.plan, res.seconds["plan"] = deferred


#: Under a casting strategy, a plan keeping more than this share of the parameters in FP32 costs about
#: what FP32 master weights cost: the weight-update and format changes are tried before it is taken. (Under
#: autocast the weights are FP32 anyway, and a kept module only changes where its own ops run.)
MAX_KEPT_SHARE = 0.5


def _shrink(model: torch.nn.Module, universe: list[str], suspects: list[str], fp8: bool,
            passes: Callable[[tuple[str, ...]], bool]) -> tuple[str, ...] | None:
    """The kept set: ddmin from the suspects where keeping them passes, else from ``universe``; then down
    the module tree (not for FP8 recipes: their layers are leaves); None where neither start passes."""
    if suspects and not covers_all(model, tuple(suspects), fp8) and passes(tuple(suspects)):
        start = suspects
    elif universe and passes(tuple(universe)):
        start = universe
    else:
        return None
    keep = ddmin(start, passes)
    return keep if fp8 else _one_minimal(refine(keep, model, passes), passes)


def _one_minimal(keep: tuple[str, ...], passes: Callable[[tuple[str, ...]], bool]) -> tuple[str, ...]:
    """``keep`` less every module whose dropping still passes, until none can be dropped (refining down the
    tree can make an earlier module unnecessary)."""
    for m in keep:
        rest = tuple(k for k in keep if k != m)
        if rest and passes(rest):
            return _one_minimal(rest, passes)
    return keep


def _keep(r: _Runner, res: SearchResult, strategy: Strategy, window: Window, diag: Diagnosis | None,
          mk: Callable[..., Plan], reserve: int = 0) -> tuple[Plan, float | None] | None:
    """Modules kept in higher precision: ddmin from the suspects (or the top of the module tree; for FP8
    recipes the GEMM layers), then refined down the tree; (plan, its step time) or None. Where the budget
    (less ``reserve`` runs for the later changes) runs out first, the passing set with the fewest
    parameters found so far stands (it passed: it is a plan, if not a minimal one)."""
    fp8 = strategy.compute in ("fp8", "fp4")
    fmt = "bf16" if fp8 else "fp32"
    universe = gemm_layers(r.model) if fp8 else callable_children(r.model)
    notes = [d for d in (diag.lines() if diag else [])[:2] if not d.startswith(("no inf/NaN", "underflow: no "))]
    if strategy.compute == "fp16" and window.empty:
        notes.append(f"FP16 loss-scale window of the FP32 gradients: {window_sentence(window)}")
    memo: dict[tuple[str, ...], tuple[bool, float | None]] = {}  # kept set -> (passed, step time)

    def passes(keep: tuple[str, ...]) -> bool:
        keep = tuple(sorted(with_tied(r.model, keep) if strategy.apply == "cast" else keep))
        if keep not in memo:
            plan = mk(strategy, "keep", notes, keep, fmt)
            rec, inner = r.run(plan.strategy, plan, reserve)
            res.tried.append(_line(plan, rec))
            memo[keep] = rec["outcome"] == "pass", _step_seconds(rec, inner)
        return memo[keep][0]

    saturated = saturated_layers(r.spec, r.device) if fp8 else {}
    suspects = [n for n in universe if n in saturated] or _suspects(diag, window, strategy, r.model)
    try:
        keep = _shrink(r.model, universe, suspects, fp8, passes)
    except OutOfRuns as exc:
        found = [k for k, (ok, _) in memo.items() if ok and not covers_all(r.model, k, fp8)]
        res.tried.append(str(exc) + ("; the smallest passing set found stands" if found else ""))
        keep = min(found, key=lambda k: param_share(r.model, k)) if found else None
    if keep is None:
        res.tried.append(f"modules kept in {fmt.upper()}: none passes" + (" (the model has no module to keep)"
                                                                          if not universe else ""))
        return None
    if covers_all(r.model, keep, fp8):
        res.tried.append(f"only keeping every {'GEMM layer' if fp8 else 'parameter'} in {fmt.upper()} passes: that "
                         "is the higher precision itself, no plan")
        return None
    runs, many = len(memo), len(keep) > 1
    smaller = "dropping any one of them" if many else "keeping nothing (the strategy as it is)"
    notes.insert(0, f"delta debugging ({runs} run{'s' if runs > 1 else ''}): keeping {'these' if many else 'this'} "
                    f"passes; {smaller} fails")
    notes[1:1] = [f"per-tensor E4M3 scaling (amax -> 448) flushes {100 * saturated[k][0]:.3g}% of `{k}`'s "
                  f"{saturated[k][1]} entries to zero" for k in keep if k in saturated]
    keep = tuple(sorted(with_tied(r.model, keep) if strategy.apply == "cast" else keep))
    return mk(strategy, "keep", notes, keep, fmt), memo[keep][1]
