"""Plain words for the FP16 loss-scale window, and one recommendation line per model.

A dynamic loss scaler can only help while the gradients' dynamic range fits FP16's: scaled by S,
the largest gradient must stay below 65504 and all but ``budget`` of the smallest must stay above
half of 2^-24 (they round to zero below). The span a model needs is
``log2(max|g|) - log2(q)``, ``q`` the ``budget``-quantile of the non-zero |g| of the tensor that needs
the largest scale; FP16 spans ``log2(65504 / 2^-24)``, about 2^40 (:attr:`Format.dynamic_range_log2`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

from .diagnose import Diagnosis
from ..values.formats import FORMATS
from ..report.tables import compute_format
from ..judge.sensitivity import chaotic_note
from ..results import FAILURES
from ..judge.window import TensorWindow, Window, pow2_above, pow2_below

__all__ = ["gradient_span", "window_sentence", "recommend", "PREFERENCE"]

#: Which passing strategy to name first: no loss scaler needed (bf16), then the real GradScaler, then
#: the rest; FP32 and TF32 last (they keep FP32's memory footprint and add no range).
PREFERENCE = ("bf16", "fp16-gradscaler", "fp16-dynamic", "bf16-master", "fp16-master", "fp16-static", "fp16",
              "bf16-pure", "fp16-pure", "tf32", "fp32")
FP16 = FORMATS["fp16"]


def _p2(x: float) -> str:
    return f"2^{int(round(math.log2(x)))}"


def _live(w: Window) -> list[TensorWindow]:
    return [t for n, t in w.per_tensor.items() if n != "(all)" and t.max_abs > 0]


def _quantile(w: Window, t: TensorWindow) -> float:
    """The ``budget``-quantile of the tensor's non-zero |g|, recovered from its lower scale bound."""
    return FORMATS[w.format].smallest / (2.0 * t.lo)


def gradient_span(w: Window) -> float | None:
    """log2 of the range the gradients need: max |g| over tensors down to the tightest tensor's quantile."""
    live = _live(w)
    if not live or w.lo_tensor is None:
        return None
    top = max(t.max_abs for t in live)
    return math.log2(top) - math.log2(_quantile(w, w.per_tensor[w.lo_tensor]))


def window_sentence(w: Window) -> str:
    """The loss-scale window in plain words, in the powers of two a dynamic scaler can reach; when it
    is empty, the two tensors that pull apart and the scale each needs."""
    if not _live(w) or w.lo_tensor is None or w.hi_tensor is None:
        return "no non-zero gradient: nothing to scale"
    fmt = FORMATS[w.format]
    name = fmt.name.upper()
    if not w.empty:
        lo2, hi2 = w.pow2
        if lo2 is None:
            return f"{name} loss scales in ({w.lo:.3g}, {w.hi:.3g}) work, but no power of two lies inside"
        return (f"{name} loss scales from {_p2(lo2)} to {_p2(hi2)} keep every tensor in range "
                f"(`{w.lo_tensor}` sets the lower end, `{w.hi_tensor}` the upper)")
    lo_t, hi_t = w.per_tensor[w.lo_tensor], w.per_tensor[w.hi_tensor]
    need_lo, need_hi = pow2_above(w.lo), pow2_below(w.hi)
    return (f"no single {name} loss scale works: `{w.lo_tensor}` needs S >= {_p2(need_lo)} so that no more than "
            f"{100 * w.budget:g}% of its gradients (the smallest is {lo_t.min_nonzero:.3g}) round to zero below "
            f"half of {name}'s smallest subnormal {_p2(fmt.smallest)}, while `{w.hi_tensor}` needs S <= {_p2(need_hi)} "
            f"so that its largest gradient ({hi_t.max_abs:.3g}) stays below {name}'s max {fmt.max:g}; the two "
            f"pull {_p2(need_lo / need_hi)} apart")


def _ordered(labels: Iterable[str]) -> list[str]:
    labels = list(labels)
    rank = {n: i for i, n in enumerate(PREFERENCE)}
    return sorted(labels, key=lambda s: (rank.get(s, len(PREFERENCE) - 2), labels.index(s)))


def recommend(records: list[dict[str, Any]], window: Window, diagnoses: dict[str, Diagnosis]) -> str:
    """One line, ``"<strategy>: <why>"``: which strategy to use for this model, from its records (one per
    strategy), the FP16 window of its FP32 gradients and the diagnoses of the strategies that failed.

    Where the training is chaotic at this horizon (FP32 from weights one ulp apart drifts as far as the
    strategies do: :mod:`harness.judge.sensitivity`), trajectory errors say nothing about precision: the line
    says so, and never that every reduced-precision strategy failed because of them."""
    line = _recommend(records, window, diagnoses)
    chaos = _chaos(records)
    return f"{line}; but {chaos}" if chaos and not line.startswith(CHAOTIC_HEAD) else line


#: How a recommendation starts when a chaotic run left nothing to choose on.
CHAOTIC_HEAD = "none can be judged"


def _chaos(records: list[dict[str, Any]]) -> str:
    sens = next(((r.get("reference") or {}).get("fp32_sensitivity") for r in records
                 if (r.get("reference") or {}).get("fp32_sensitivity")), None)
    return chaotic_note(sens)


def _recommend(records: list[dict[str, Any]], window: Window, diagnoses: dict[str, Diagnosis]) -> str:
    by = {r["strategy"]: r for r in records}
    compute = {s: compute_format(r) for s, r in by.items()}
    passing = [s for s in _ordered(by) if by[s]["outcome"] == "pass"]
    reduced = [s for s in passing if compute[s] not in ("fp32", "fp64", "tf32")]
    bf16 = [s for s in reduced if compute[s] == "bf16"]
    fp16 = [s for s in reduced if compute[s] == "fp16"]
    failed = {s: by[s]["outcome"] for s in by if by[s]["outcome"] in FAILURES}
    span = gradient_span(window)
    range16 = f"FP16's 2^{FP16.dynamic_range_log2:.0f}"
    span_txt = f"gradients span 2^{span:.0f}" if span is not None else "no gradient to scale"
    overflow = next((d.forward for s, d in diagnoses.items() if compute.get(s) == "fp16" and d.forward is not None
                     and d.forward.cause == "overflow"), None)
    full = [s for s in passing if compute[s] in ("tf32", "fp32")] + ["fp32"]

    def listed(keep: Callable[[str], bool]) -> str:
        return ", ".join(f"{s}: {o}" for s, o in failed.items() if keep(compute[s]))

    if window.empty or overflow is not None:  # no FP16 strategy can work: BF16 (or another) must
        # a forward overflow is the first cause: once the activations are inf, no gradient the window was
        # measured on is what the run computes, and no loss scale changes the forward pass
        if overflow is not None:
            why = (f"activations of `{overflow.module}` pass FP16's max {FP16.max:g} in the forward pass, which "
                   "no loss scale fixes; BF16 keeps FP32's range")
        else:
            why = f"{span_txt}, wider than {range16}: {window_sentence(window)}"
        others = bf16 + [s for s in reduced if compute[s] not in ("fp16", "bf16")]
        if others:
            return f"{others[0]}: {why}"
        if "bf16" not in compute.values():
            return f"bf16 (not tried here: add --strategy bf16): {why}"
        return f"{full[0]}: {why}; BF16 failed too ({listed(lambda c: c == 'bf16')})"
    if bf16:
        also = f", so {fp16[0]} works too" if fp16 else ""
        return (f"{bf16[0]}: follows FP32's training ({_divergence(by[bf16[0]])}) with no loss scaling; "
                f"{span_txt}, within {range16}{also}")
    if fp16:
        bf = listed(lambda c: c == "bf16")
        return (f"{fp16[0]}: {span_txt}, within {range16} ({window_sentence(window)}); "
                + (f"BF16 failed ({bf})" if bf else "BF16 not tried"))
    if reduced:
        if len(reduced) == 1:
            return f"{reduced[0]}: the only reduced-precision strategy that passed ({_divergence(by[reduced[0]])})"
        return (f"{reduced[0]}: passed ({_divergence(by[reduced[0]])}), as did {', '.join(reduced[1:])}; "
                "no FP16 or BF16 strategy did")
    chaos = _chaos(records)
    judged = {s: o for s, o in failed.items() if o != "diverged"}  # a trajectory error is chaos's as much
    if chaos and not judged:
        return (f"{CHAOTIC_HEAD} at this horizon ({chaos}): that {listed(lambda c: True)} diverged is no "
                "evidence against reduced precision; check with fewer --steps")
    if not failed:  # nothing reduced was judged: no failure to cite, and no evidence against reduced precision
        unsupported = [s for s in by if by[s]["outcome"] == "unsupported"]
        return (f"{full[0]}: no reduced-precision strategy was judged here"
                + (f" ({', '.join(unsupported)}: unsupported)" if unsupported else "")
                + "; check again with one that runs on this device")
    return f"{full[0]}: every reduced-precision strategy tried failed ({listed(lambda c: True)})"


def _divergence(rec: dict[str, Any]) -> str:
    d = rec.get("metrics", {}).get("loss_divergence")
    b = rec.get("bound")
    if d is None:
        return "no loss curve"
    if ((rec.get("reference") or {}).get("fp32_sensitivity") or {}).get("chaotic"):
        return f"loss divergence {float(d):.2g}, not judged: chaotic"
    return f"loss divergence {float(d):.2g}" + (f" <= {float(b):.2g}" if b is not None else "")
