"""Verdicts: a typed outcome and a one-line reason that cites the measured number and the bound.

Checks run in this order, the first that fires decides:

0. the reference holds inf/NaN (``ref_nonfinite``, ``grad_ref_nonfinite``, ``loss_ref_nonfinite``) and the
   scenario declared no ``nonfinite_reference``: ``error``, nothing can be judged against it (the engine
   says so before running the strategy; this is the same rule for any other caller);
1. the loss scaler ran out of room (``scale_exhausted``; the reason starts with the direction, ``max:``
   or ``min:``, also put in ``metrics["scale_direction"]``): it raised at its floor, or ended the run
   stalled there, while gradients still overflowed; its scale collapsed below FP32's normal range (below
   2^-128, 1/scale is inf: every later step is skipped however healthy its gradients) or grew to inf in
   its store (only a policy that grows unchecked does: Megatron-LM's FP32 tensor, ``to_inf=allow``;
   torch's GradScaler refuses such a growth); or it reached its cap while gradients still underflowed.
   The trace names the scaler that ran, and its cap and floor are read from there;
2. the scaler skipped more than ``STALL_RATE`` of the steps (``stalled``);
3. anything finite in the reference is inf/NaN here (``overflow``);
4. more than the underflow budget of the reference's non-zero values became zero (``underflow``), pooled
   or in any one gradient tensor (named in the reason);
5. a training run lost more (update, weight) pairs to absorption (``w + dw == w``) than its reference,
   beyond the underflow budget, or, where the reference is declared non-finite, an entry it holds as
   inf/NaN is something else here, or the normwise relative error exceeds the bound of
   :mod:`harness.judge.tolerance` (``diverged``; against an all-zero reference the reason says so);
6. nothing was compared (no ``rel_err``, ``grad_rel_err`` or ``loss_divergence``): ``error``, unless every
   entry is a declared inf/NaN of the reference matched exactly (``pass``, saying so);
7. otherwise ``pass``.

Every verdict of :func:`judge` carries ``margin``: the worst error metric divided by the bound it was
judged against (None where no error metric was compared).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..values.formats import FORMATS, Format
from ..results import ERROR_METRICS, FAILURES, OUTCOMES, SEVERITY
from . import sensitivity as _sens
from ..core.scaling import ScalerSpec, format_number, parse_scaler
from .tolerance import bound, describe

__all__ = ["Verdict", "OUTCOMES", "FAILURES", "SEVERITY", "judge", "STALL_RATE", "UNDERFLOW_BUDGET"]

#: A scaler that skips more than this fraction of steps has stalled training.
STALL_RATE = 0.5
#: Default fraction of the reference's non-zero values that may be lost to underflow.
UNDERFLOW_BUDGET = 0.01


@dataclass(frozen=True)
class Verdict:
    outcome: str
    reason: str
    bound: float | None = None
    direction: str | None = None  # scale_exhausted: "max" or "min", the way the scale ran out of room
    margin: float | None = None  # worst error metric / bound (None where nothing was compared)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}; outcomes: {', '.join(OUTCOMES)}")


def _e(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2e}"


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


FP64_FLOOR = "FP32's own error against FP64 (the reference here)"


def _how(fmt: Format, n: int, kappa: float, factor: float, truncating: bool, floor: float,
         floor_source: str = FP64_FLOOR) -> str:
    if floor > bound(fmt, n, kappa, factor, truncating):
        return floor_source
    return describe(fmt, n, kappa, factor, truncating)


#: A loss scale at or past this rounds to inf as the FP32 tensor the backward pass multiplies by.
_FP32_INF_AT = FORMATS["fp32"].overflow_threshold
#: Below this 1/scale rounds to inf in FP32 (GradScaler computes it so): every unscaled gradient is inf/NaN.
_FP32_INV_INF_BELOW = 1.0 / _FP32_INF_AT


def _ran(sc: dict, spec: ScalerSpec | None) -> ScalerSpec | None:
    """The scaler that actually ran (the trace names it; a scenario may replace the strategy's)."""
    try:
        return parse_scaler(str(sc.get("scaler")))
    except ValueError:
        return spec


def _exhausted(direction: str, text: str) -> Verdict:
    """``scale_exhausted`` in ``direction`` (the reason starts with it, for people and old readers)."""
    return Verdict("scale_exhausted", f"{direction}: {text}", direction=direction)


def _grown_to_inf(sc: dict, spec: ScalerSpec | None, of: str) -> str:
    """The reason for a scale that grew to inf in its store (a scale past FP32's max that its store holds
    finite, as DeepSpeed's Python float does, makes the scaled loss overflow and backs off: not this)."""
    finite = [x for x in sc.get("trajectory", []) if isinstance(x, (int, float)) and math.isfinite(x)]
    grown = max(finite) * spec.growth if finite and spec else math.inf
    store = spec.store.upper() if spec else "its store"
    return (f"loss scale grew to {format_number(grown)}, past {store}'s max: the scale it holds is inf, every "
            f"scaled loss overflows and backing off from inf stays inf (a policy that grows unchecked, "
            f"to_inf=allow); {of}")


def _scaling(m: dict, spec: ScalerSpec | None, budget: float) -> Verdict | None:
    """``scale_exhausted`` (reason ``max: ...`` or ``min: ...``, the direction the scale ran out of room
    in) or ``stalled`` from the scaler's trace; None when the scaler kept training going."""
    sc = m.get("scaler")
    if not sc or not sc.get("steps") and not sc.get("raised"):
        return None
    spec = _ran(sc, spec)
    steps, skipped = sc["steps"], sc["skipped"]
    of = f"{skipped} of {steps} steps skipped"
    under = max(m.get("grad_underflow_frac", 0.0), m.get("underflow_frac", 0.0))
    s_min, s_max, s_final = sc["scale_min"], sc["scale_max"], sc["scale_final"]
    if sc.get("raised"):
        return _exhausted("min", f"gradients still overflow at the floor scale "
                                          f"{format_number(spec.min) if spec else '?'} and the policy raises there "
                                          f"(floor=raise): training stopped after {steps} steps, {skipped} skipped")
    if sc["scale_nonfinite"]:  # only a policy that grows unchecked (to_inf=allow) holds inf; torch refuses
        return _exhausted("max", _grown_to_inf(sc, spec, of))
    if s_final is not None and s_final < FORMATS["fp32"].min_normal and skipped:
        silent = ("below 2^-128 1/scale overflows FP32, so the unscaled gradients are inf/NaN even when healthy"
                  if s_final < _FP32_INV_INF_BELOW else "below FP32's smallest normal")
        poisoned = (f"; {m['nonfinite_params']} weights inf/NaN afterwards: non-finite gradients were applied"
                    if m.get("nonfinite_params") else "")
        return _exhausted("min", f"loss scale collapsed from {format_number(s_max)} to "
                                          f"{format_number(s_final)} ({silent}); {of}{poisoned}")
    at_floor = spec is None or s_final <= spec.min
    if sc["floor_steps"] and at_floor:
        return _exhausted("min", f"gradients still overflow at the floor scale {format_number(s_min)} "
                                          f"and the policy keeps skipping there (floor=stall): {sc['floor_steps']} "
                                          f"floor steps, {of}")
    if spec is not None and math.isfinite(spec.max) and s_max >= spec.max and under > budget:
        return _exhausted("max", f"at the cap scale {format_number(spec.max)} gradients still underflow: "
                                          f"{_pct(under)} of non-zero values lost > budget {_pct(budget)}")
    if steps and skipped / steps > STALL_RATE:
        floor = f", {sc['floor_steps']} of them at the floor before recovering" if sc["floor_steps"] else ""
        return Verdict("stalled", f"skip_rate {skipped}/{steps} = {_pct(skipped / steps)} > {_pct(STALL_RATE)}"
                                  f"{floor}; scale {format_number(s_min)}..{format_number(s_max)}")
    return None


#: (metric of the reference's inf/NaN count, of the candidate's mismatches there, what it is) per output.
NONFINITE_REF = (("ref_nonfinite", "nonfinite_mismatch", "output"),
                 ("grad_ref_nonfinite", "grad_nonfinite_mismatch", "gradient"),
                 ("loss_ref_nonfinite", "loss_nonfinite_mismatch", "loss"))


def _margin(m: dict[str, Any], b: float) -> float | None:
    errs = [float(m[k]) for k in ERROR_METRICS if isinstance(m.get(k), (int, float))]
    return max(errs) / b if errs and b > 0 else None


def _nonfinite_reference(m: dict[str, Any], declared: str | None) -> Verdict | None:
    """``error`` for an undeclared inf/NaN reference; ``diverged`` where a declared one is not matched."""
    held = [(what, m[ref], m.get(mis, 0)) for ref, mis, what in NONFINITE_REF if m.get(ref)]
    if not held:
        return None
    if not declared:
        said = ", ".join(f"{what} {n} {'steps' if what == 'loss' else 'entries'}" for what, n, _ in held)
        return Verdict("error", f"reference not finite ({said} inf/NaN) and the scenario declares no "
                                "nonfinite_reference: nothing can be judged against it")
    for what, n, bad in held:
        if bad:
            return Verdict("diverged", f"{what}: {bad} of the {n} values the reference holds as inf/NaN (declared: "
                                       f"{declared}) are something else here")
    return None


def judge(m: dict[str, Any], fmt: Format, n: int, kappa: float = 1.0, factor: float = 1.0,
          underflow_budget: float = UNDERFLOW_BUDGET, truncating: bool = False,
          scaler: ScalerSpec | None = None, floor: float = 0.0, floor_source: str = FP64_FLOOR,
          nonfinite_reference: str | None = None, sensitivity: dict[str, Any] | None = None) -> Verdict:
    """Classify one case's metrics (see module doc). ``floor`` is FP32's own error where FP64 is the
    reference, plus a margin of the FP32 reference's run-to-run spread where it is nondeterministic
    (``engine._floor``; ``floor_source`` says which, for the reason): no strategy is asked to be more
    accurate than FP32 itself. ``nonfinite_reference`` is the scenario's declared reason for an inf/NaN
    reference. A ``scale_exhausted`` verdict also sets ``m["scale_direction"]`` (``"max"`` or ``"min"``).
    ``sensitivity`` (a training case's ``fp32_sensitivity``, :mod:`harness.judge.sensitivity`) floors each error
    metric's bound at a multiple of FP32's own spread under one-ulp perturbations. Every reason of a chaotic
    case says so, and every reason of a run whose GEMMs ran only partly in the judged format
    (``m["gemm_coverage"]``) says how many did. The verdict's ``margin`` is the worst error metric over the
    bound it was judged against."""
    b = max(bound(fmt, n, kappa, factor, truncating), floor)
    v = _rules(m, fmt, underflow_budget, scaler, nonfinite_reference, b)
    if v is None:
        v = _error_bounds(m, b, lambda: _how(fmt, n, kappa, factor, truncating, floor, floor_source),
                          nonfinite_reference, sensitivity)
    elif v.outcome != "error":
        v = Verdict(v.outcome, v.reason, b, v.direction, _margin(m, b))
    notes = [t for t in (_sens.chaotic_note(sensitivity), _coverage_note(m.get("gemm_coverage"))) if t]
    if notes:
        v = Verdict(v.outcome, "; ".join([v.reason, *notes]), v.bound, v.direction, v.margin)
    return v


def _rules(m: dict[str, Any], fmt: Format, underflow_budget: float, scaler: ScalerSpec | None,
           declared: str | None, b: float) -> Verdict | None:
    """The checks before the error bounds (module doc, 1-5), in order; None when none fires."""
    nf = _nonfinite_reference(m, declared)
    if nf is not None and nf.outcome == "error":
        return nf
    v = _scaling(m, scaler, underflow_budget)
    if v is not None:
        if v.direction is not None:
            m["scale_direction"] = v.direction  # for reports to filter on
        return v
    for key, what in (("nonfinite", "output"), ("grad_nonfinite", "gradient"), ("loss_nonfinite", "loss")):
        if m.get(key):
            total = m.get("numel") if key == "nonfinite" else None
            of = f" of {total}" if total else ""
            limit = f" ({fmt.name} max {fmt.max:g})" if fmt.max < 1e38 else ""
            return Verdict("overflow", f"{what}: {m[key]}{of} values inf/NaN where FP32 is finite{limit}", b)
    # every lost gradient is a lost update direction, so gradients count entries; an output only fails
    # when the entries it lost carried more than the budget of its norm
    for key, what, unit in (("grad_underflow_frac", "gradient", "of non-zero values"),
                            ("underflow_mass", "output", "of the norm")):
        if m.get(key, 0.0) > underflow_budget:
            return Verdict("underflow", f"{what}: {_pct(m[key])} {unit} flushed to zero > budget "
                                        f"{_pct(underflow_budget)} ({fmt.name} smallest {fmt.smallest:.3g})", b)
    v = _tensor_underflow(m, fmt, underflow_budget, b)
    if v is not None:
        return v
    # an update absorbed by the weight (w + dw == w) is a precision error, not an underflow: count the
    # (update, weight) pairs lost beyond the reference's own (training runs, harness.models.user_model)
    if m.get("updates_lost_excess", 0.0) > underflow_budget:
        return Verdict("diverged", f"updates: {_pct(m['updates_lost'])} of (update, weight) pairs with a gradient "
                                   f"left the weight unchanged (w + dw == w), {_pct(m['updates_lost_excess'])} more "
                                   f"than the reference > budget {_pct(underflow_budget)}", b)
    return nf  # a declared inf/NaN reference that was not matched (``diverged``), or None


def _error_bounds(m: dict[str, Any], base: float, how_base: Callable[[], str], declared: str | None,
                  sens: dict[str, Any] | None) -> Verdict:
    """Each error metric against its bound: ``base`` (the format's, or FP32's own error where larger), floored
    per metric at :data:`harness.judge.sensitivity.FACTOR` times FP32's measured sensitivity in that metric
    where a training case measured it. In a chaotic case the trajectory's metrics (drift, loss divergence)
    are not judged: FP32 started one ulp away moves as far, so they cannot tell precision's part; the first
    update's gradients (same weights) still are. The bound of a verdict is that of the metric it names (of
    a pass: the metric closest to its bound), so its margin is error / bound."""
    floors = _sens.floors(sens) if sens else {}
    unjudged = [k for k in _sens.TRAJECTORY if k in m] if sens and sens.get("chaotic") else []
    keys = [k for k in ERROR_METRICS if k in m and k not in unjudged]

    def bound_of(key: str) -> float:
        return max(base, floors.get(key, 0.0))

    def how(key: str) -> str:
        return _sens.describe(sens, key) if floors.get(key, 0.0) > base else how_base()

    ratios = {k: m[k] / bound_of(k) if bound_of(k) > 0 else math.inf for k in keys}
    margin = max(ratios.values()) if ratios else None  # the worst error metric over its bound
    for key in keys:
        if m[key] > bound_of(key):
            zero = (" (the reference is all zeros: relative error is undefined, and a non-zero value counts as "
                    "inf)") if m.get("ref_all_zero" if key == "rel_err" else "grad_ref_all_zero") else ""
            return Verdict("diverged", f"{key} {_e(m[key])}{zero} > {_e(bound_of(key))} = {how(key)}", bound_of(key),
                           margin=margin)
    skipped = f"; not judged (chaotic): {', '.join(f'{k} {_e(m[k])}' for k in unjudged)}" if unjudged else ""
    if not keys:
        if unjudged:  # chaotic, and nothing at the same weights compared: no pass without a judgement
            return Verdict("unsupported", f"not judged: the run is too chaotic at this horizon to tell precision's "
                                          f"part, and no metric at the same weights was compared{skipped}")
        held = [f"{m[ref]} {what}" for ref, _, what in NONFINITE_REF if m.get(ref)]
        if held:  # declared, and every inf/NaN of the reference matched (checked before)
            return Verdict("pass", f"every compared value is inf/NaN in the reference (declared: {declared}) "
                                   f"and the same here ({', '.join(held)}); nothing finite to compare", base)
        return Verdict("error", "nothing was compared: no rel_err, grad_rel_err or loss_divergence (the outputs "
                                "hold no entry that is finite in the reference)")
    worst = max(keys, key=lambda k: ratios[k])
    raised = [k for k in keys if floors.get(k, 0.0) > base]
    errs = ", ".join(f"{k} {_e(m[k])}" + (f" <= {_e(bound_of(k))}" if raised else "") for k in keys)
    within = (f" (within FP32's own sensitivity for {', '.join(raised)}: {_sens.describe(sens, raised[0])})"
              if raised else "")
    return Verdict("pass", errs + ("" if raised else f" <= {_e(base)}") + within + skipped, bound_of(worst),
                   margin=margin)


def _tensor_underflow(m: dict[str, Any], fmt: Format, budget: float, b: float) -> Verdict | None:
    """``underflow`` when one parameter tensor lost more than ``budget`` of its non-zero gradients, however
    small its share of the pooled count: a tensor that loses all of them stops learning (an auxiliary head
    on a small loss term). Names the worst tensor and counts the others beyond the budget. (In a training
    run the count leaves out computational zeros, rounding noise of a zero gradient: metrics.compare.)"""
    per = {k: v for k, v in (m.get("grad_underflow_by_tensor") or {}).items() if v > budget}
    if not per:
        return None
    name, worst = max(per.items(), key=lambda kv: kv[1])
    more = f"; {len(per) - 1} more tensors beyond the budget" if len(per) > 1 else ""
    return Verdict("underflow", f"gradient of `{name}`: {_pct(worst)} of its non-zero values flushed to zero > "
                                f"budget {_pct(budget)} ({fmt.name} smallest {fmt.smallest:.3g}){more}", b)


def _coverage_note(cov: dict[str, Any] | None) -> str:
    """What ran outside the judged format, when a strategy's GEMM path covered only some GEMM layers."""
    if not cov or cov.get("covered") == cov.get("total"):
        return ""
    missed = ", ".join(f"{t} {c}/{n}" for t, (c, n) in cov["by_type"].items() if c < n)
    return (f"only {cov['covered']} of {cov['total']} GEMM layers ran in {cov['format']} (not: {missed}); "
            "the rest ran in the activation format")
