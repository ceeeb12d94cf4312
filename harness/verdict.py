"""Verdicts: a typed outcome and a one-line reason that cites the measured number and the bound.

Checks run in this order, the first that fires decides:

1. the loss scaler ran out of room (``scale_exhausted``): it raised or stalled at its floor while
   gradients still overflowed, its scale collapsed to zero or overflowed FP32, or it sat at its cap
   while gradients still underflowed;
2. the scaler skipped more than ``STALL_RATE`` of the steps (``stalled``);
3. anything finite in the reference is inf/NaN here (``overflow``);
4. more than the underflow budget of the reference's non-zero values became zero (``underflow``);
5. the normwise relative error exceeds the bound of :mod:`harness.tolerance` (``diverged``);
6. otherwise ``pass``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .formats import Format
from .scaling import ScalerSpec, format_number
from .tolerance import bound, describe

__all__ = ["Verdict", "OUTCOMES", "FAILURES", "SEVERITY", "judge", "STALL_RATE", "UNDERFLOW_BUDGET"]

OUTCOMES = ("pass", "diverged", "overflow", "underflow", "scale_exhausted", "stalled", "unsupported", "error")
FAILURES = tuple(o for o in OUTCOMES if o not in ("pass", "unsupported"))
#: How bad an outcome is, for the gate: higher is worse.
SEVERITY = {"pass": 0, "unsupported": 0, "diverged": 1, "underflow": 2, "stalled": 3, "overflow": 4,
            "scale_exhausted": 5, "error": 6}
#: A scaler that skips more than this fraction of steps has stalled training.
STALL_RATE = 0.5
#: Default fraction of the reference's non-zero values that may be lost to underflow.
UNDERFLOW_BUDGET = 0.01


@dataclass(frozen=True)
class Verdict:
    outcome: str
    reason: str
    bound: float | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}; outcomes: {', '.join(OUTCOMES)}")


def _e(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2e}"


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def _how(fmt: Format, n: int, kappa: float, factor: float, truncating: bool, floor: float) -> str:
    if floor > bound(fmt, n, kappa, factor, truncating):
        return f"FP32's own error against FP64 (the reference here)"
    return describe(fmt, n, kappa, factor, truncating)


def _scaling(m: dict, spec: ScalerSpec | None, budget: float) -> Verdict | None:
    sc = m.get("scaler")
    if not sc or not sc.get("steps") and not sc.get("raised"):
        return None
    steps, skipped = sc["steps"], sc["skipped"]
    under = max(m.get("grad_underflow_frac", 0.0), m.get("underflow_frac", 0.0))
    if sc.get("raised"):
        return Verdict("scale_exhausted", f"floor: scaler raised after {steps} steps ({skipped} skipped): {sc['raised']}")
    if sc["scale_nonfinite"]:
        return Verdict("scale_exhausted", f"max: loss scale overflowed FP32 to inf ({sc['scale_nonfinite']} of "
                                          f"{steps} steps), so 1/scale = 0 and {skipped} steps were skipped")
    if sc["scale_final"] is not None and sc["scale_final"] < 2.0**-126 and skipped:
        return Verdict("scale_exhausted", f"min: loss scale collapsed to {format_number(sc['scale_final'])} "
                                          f"(below FP32's smallest normal, 1/scale overflows); {skipped} of {steps} "
                                          "steps skipped")
    if sc["floor_steps"]:
        return Verdict("scale_exhausted", f"min: gradients still overflow at the floor scale "
                                          f"{format_number(sc['scale_min'])}: {sc['floor_steps']} floor steps, "
                                          f"{skipped} of {steps} skipped")
    if spec is not None and math.isfinite(spec.max) and sc["scale_max"] >= spec.max and under > budget:
        return Verdict("scale_exhausted", f"max: at the cap scale {format_number(spec.max)} gradients still underflow: "
                                          f"{_pct(under)} of non-zero values lost > budget {_pct(budget)}")
    if steps and skipped / steps > STALL_RATE:
        return Verdict("stalled", f"skip_rate {skipped}/{steps} = {_pct(skipped / steps)} > {_pct(STALL_RATE)}; "
                                  f"scale {format_number(sc['scale_min'])}..{format_number(sc['scale_max'])}")
    return None


def judge(m: dict[str, Any], fmt: Format, n: int, kappa: float = 1.0, factor: float = 1.0,
          underflow_budget: float = UNDERFLOW_BUDGET, truncating: bool = False,
          scaler: ScalerSpec | None = None, floor: float = 0.0) -> Verdict:
    """Classify one case's metrics (see module doc). ``floor`` is FP32's own error where FP64 is the
    reference: no strategy is asked to be more accurate than FP32 itself."""
    b = max(bound(fmt, n, kappa, factor, truncating), floor)
    v = _scaling(m, scaler, underflow_budget)
    if v is not None:
        return Verdict(v.outcome, v.reason, b)
    for key, what in (("nonfinite", "output"), ("grad_nonfinite", "gradient"), ("loss_nonfinite", "loss")):
        if m.get(key):
            total = m.get("numel") if key == "nonfinite" else None
            of = f" of {total}" if total else ""
            limit = f" (|ref| max beyond {fmt.name} max {fmt.max:g})" if fmt.max < 1e38 else ""
            return Verdict("overflow", f"{what}: {m[key]}{of} values inf/NaN where FP32 is finite{limit}", b)
    # every lost gradient is a lost update direction, so gradients count entries; an output only fails
    # when the entries it lost carried more than the budget of its norm
    for key, what, unit in (("grad_underflow_frac", "gradient", "of non-zero values"),
                            ("underflow_mass", "output", "of the norm")):
        if m.get(key, 0.0) > underflow_budget:
            return Verdict("underflow", f"{what}: {_pct(m[key])} {unit} flushed to zero > budget "
                                        f"{_pct(underflow_budget)} ({fmt.name} smallest {fmt.smallest:.3g})", b)
    for key in ("rel_err", "grad_rel_err"):
        if key in m and m[key] > b:
            return Verdict("diverged", f"{key} {_e(m[key])} > {_e(b)} = {_how(fmt, n, kappa, factor, truncating, floor)}", b)
    if "loss_divergence" in m and m["loss_divergence"] > b:
        return Verdict("diverged", f"loss_divergence {_e(m['loss_divergence'])} > {_e(b)} = "
                                   f"{_how(fmt, n, kappa, factor, truncating, floor)}", b)
    errs = [f"{k} {_e(m[k])}" for k in ("rel_err", "grad_rel_err", "loss_divergence") if k in m]
    return Verdict("pass", f"{', '.join(errs) or 'no error'} <= {_e(b)}", b)
