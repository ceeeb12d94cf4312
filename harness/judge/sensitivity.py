"""FP32's own sensitivity to rounding-level perturbation: the floor a training run's error is judged above.

A training trajectory can amplify any difference in its inputs: SGD with momentum through BatchNorm
on small batches, or Adam turning gradients that are pure rounding noise into full-size steps of random
sign. Then FP32 does not reproduce *itself* once its weights move by one unit in the last place, and a
strategy whose trajectory differs from FP32's by as much has shown nothing about its precision. The
stochastic-arithmetic tools (CADNA, Verificarlo) estimate the significant digits of a result the same
way: run it a few times with rounding-level perturbations and read the spread.

So the reference of a training case also runs FP32 :data:`RUNS` more times, each from the reference's
weights moved one ulp up or down (directions drawn per entry from the run's index, same batches, same
seed), and compares each run with the FP32 reference. The largest of each error metric over the runs
(``rel_err``: the parameter drift, ``loss_divergence``, ``grad_rel_err``) is recorded in the reference
check as ``fp32_sensitivity``, and :data:`FACTOR` times it floors that metric's bound for every strategy
(``floors``). Where the drift or the loss divergence of FP32 against itself reaches :data:`CHAOTIC`, the
run is recorded as ``chaotic``: at this horizon the trajectory says little about precision, every
verdict's reason says so, and the recommendation does not blame reduced precision for it.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..values.formats import FORMATS
from .metrics import compare
from ..results import ERROR_METRICS
from ..core.scenario import Output

__all__ = ["RUNS", "FACTOR", "FACTOR_REASON", "CHAOTIC", "measure", "computational_zeros", "floors", "describe",
           "chaotic_note"]

#: Perturbed FP32 runs per case: the largest of 3 draws is above the median draw with probability 7/8.
RUNS = 3
#: The floor is this many times FP32's measured sensitivity, for the triangle inequality: a strategy's
#: trajectory t and the reference r both sit within the spread of FP32's own runs around the exact one,
#: so |t - r| may reach the spread twice over, before precision has done anything.
FACTOR = 2.0
FACTOR_REASON = ("a strategy's run and the FP32 reference are two trajectories, each as far from the exact one "
                 "as FP32's own perturbed runs (triangle inequality)")
#: FP32's drift or loss divergence against itself at or above this: fewer than one significant decimal
#: digit of the trajectory survives a one-ulp perturbation, and no format's bound can be judged on it.
CHAOTIC = 0.1
#: The metrics whose size against :data:`CHAOTIC` makes a run chaotic (the trajectory's; gradients of the
#: first update are taken at the same weights, one ulp apart, and say nothing about the horizon).
TRAJECTORY = ("rel_err", "loss_divergence")


def measure(perturbed: Callable[[int], Output], out32: Output, out64: Output | None = None,
            runs: int = RUNS) -> dict[str, Any]:
    """Run ``perturbed(k)`` for ``k < runs`` and compare each with ``out32`` (the FP32 reference run):
    ``{"runs", "perturbation", "factor", "factor_reason", "chaotic", <metric>: largest error,
    "computational_zeros": {tensor: count}}``. A non-finite error (a perturbed run that blew up) is
    recorded as inf and makes the run chaotic.

    First the first update's gradients of the runs (and of ``out64``, the FP64 run) mark FP32's
    *computational zeros*: entries whose FP32 gradient moves by half its size or more between runs that
    differ by rounding only, so it carries no significant bit (CADNA's term). The mask goes into both
    outputs' ``extra["computational_zeros"]``, and every comparison with either leaves those entries out
    of the drift and the per-tensor underflow (:func:`harness.judge.metrics.compare`)."""
    outs = [perturbed(k) for k in range(runs)]
    zeros = computational_zeros(out32, outs + ([out64] if out64 is not None else []))
    counts: dict[str, int] = {}
    if zeros is not None:
        for o in (out32, out64):
            if o is not None:
                o.extra["computational_zeros"] = zeros
        sizes = [g.numel() for g in out32.grads.values()]  # type: ignore[union-attr]
        counts = {k: int(z.sum()) for k, z in zip(out32.grads, zeros.split(sizes)) if z.any()}  # type: ignore[arg-type]
    fp32 = FORMATS["fp32"]
    worst: dict[str, float] = {}
    for out in outs:
        m = compare(out, out32, fp32)
        for key in ERROR_METRICS:
            if key in m:
                v = float(m[key])
                worst[key] = max(worst.get(key, 0.0), v if math.isfinite(v) else math.inf)
    chaotic = any(worst.get(k, 0.0) >= CHAOTIC for k in TRAJECTORY)
    return {"runs": runs, "perturbation": "every weight moved one ulp up or down (random signs per entry)",
            **worst, "factor": FACTOR, "factor_reason": FACTOR_REASON, "chaotic": chaotic,
            "computational_zeros": counts}


def computational_zeros(out32: Output, others: list[Output]) -> torch.Tensor | None:
    """Entries of FP32's first-update gradients (flat, in the order of ``out32.grads``) whose deviation
    in any other run is at least half their size; entries that are exactly zero in every run are exact
    zeros, not computational ones. None without gradients."""
    if not out32.grads or not all(o.grads and set(o.grads) == set(out32.grads) for o in others):
        return None
    keys = list(out32.grads)
    g = torch.cat([out32.grads[k].detach().double().reshape(-1) for k in keys])
    dev = torch.zeros_like(g)
    for o in others:
        other = torch.cat([o.grads[k].detach().double().reshape(-1).to(g.device) for k in keys])  # type: ignore[index]
        d = (other - g).abs()
        dev = torch.maximum(dev, torch.nan_to_num(d, nan=math.inf))
    return (2 * dev >= g.abs()) & ~((g == 0) & (dev == 0))


def floors(sens: dict[str, Any] | None) -> dict[str, float]:
    """Per error metric, :data:`FACTOR` times FP32's measured sensitivity (finite values only: an
    infinite floor would pass everything)."""
    if not sens:
        return {}
    return {k: FACTOR * float(sens[k]) for k in ERROR_METRICS if k in sens and math.isfinite(float(sens[k]))}


def describe(sens: dict[str, Any], key: str) -> str:
    """Where the floor of ``key`` comes from, for a verdict's reason."""
    return (f"{FACTOR:g} x FP32's own sensitivity {float(sens[key]):.2e} (largest {key} of {sens.get('runs', RUNS)} "
            "FP32 runs from weights one ulp apart)")


def chaotic_note(sens: dict[str, Any] | None) -> str:
    """The sentence every verdict of a chaotic case carries; empty when the case is not chaotic."""
    if not sens or not sens.get("chaotic"):
        return ""
    parts = ", ".join(f"{k} {float(sens[k]):.2g}" for k in TRAJECTORY if k in sens)
    return (f"chaotic: FP32 itself, from weights one ulp apart, reaches {parts} at this horizon (>= {CHAOTIC:g}), "
            "so the trajectory cannot show what precision did; fewer steps can")
