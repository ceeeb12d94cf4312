"""Error metrics of a candidate output against its reference, and what makes an output comparable.

Every comparison is made in FP64 on the device where both live. One host sync per tensor pair.

Rules for what cannot be compared (no metric reports an error of 0 where nothing was compared):

* **Non-finite reference entries** are not part of the error metrics (``rel_err`` and the rest are over
  the entries finite in the reference). Their count is ``ref_nonfinite`` and ``nonfinite_mismatch``
  counts those where the candidate holds something else (the same infinity, or a NaN where the
  reference has a NaN, matches). A reference with such entries is an ``error`` unless the scenario
  declares ``nonfinite_reference`` (:func:`nonfinite_parts` says which output; the engine and
  :func:`harness.judge.verdict.judge` enforce it). A reference with no finite entry gives no error metric.
* **All-zero reference** (relative error undefined): ``rel_err`` is 0 when the candidate is exactly
  zero too and inf otherwise, and ``ref_all_zero`` is set so that the verdict says why.
  ``max_rel_err`` is over the entries non-zero in the reference, and absent where there are none;
  the underflow fractions of a reference without non-zero entries are 0 (nothing could be lost).
* **Empty, integer, bool and complex outputs** cannot be judged by a rounding-error bound:
  :func:`output_problems` names them in a reference (the case is an ``error``), and
  :func:`tensor_metrics` refuses them (``TypeError``/``ValueError``, an ``error`` record).
* **Measurements**: an output with no value, gradients or loss curve but numbers in ``extra`` (a
  device profile) is recorded and never judged (:func:`measures_only`; the engine's verdict is
  ``unsupported``, "not judged"); with nothing in ``extra`` either it is an error.
* **Shapes** must be equal, entry for entry (no broadcasting); a missing value, gradient or loss
  curve in the candidate where the reference has one is an error; so is a reference that returns
  nothing to compare.
* **Loss curves** are compared over the steps both have, and over the steps whose reference loss is
  finite (the others are counted in ``loss_ref_nonfinite``, as above); a candidate without a step in
  common with its reference has ``loss_divergence`` inf. A reference loss of exactly 0 gives a step
  divergence of 0 if the candidate's is 0 too and inf otherwise.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch

from ..values.formats import Format
from ..core.scenario import Output

__all__ = ["tensor_metrics", "compare", "ulp", "underflow_by_tensor", "output_problems", "nonfinite_parts",
           "measures_only"]


def ulp(y: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Spacing of ``fmt`` at |y| (subnormal spacing below the smallest normal)."""
    a = y.abs().clamp_min(fmt.min_normal)
    e = torch.frexp(a).exponent.to(a.dtype) - 1  # exact; CUDA's float64 log2 misses powers of two
    e = torch.where(torch.isfinite(a), e, torch.log2(a)).clamp(max=fmt.emax)
    return torch.exp2(e - fmt.fraction_bits)


def tensor_metrics(cand: torch.Tensor, ref: torch.Tensor, fmt: Format) -> dict[str, Any]:
    """rel_err (normwise), max_abs_err, max_rel_err, ulp_err, sqnr_db, and counts of entries that
    overflowed (finite in the reference, inf/NaN here) or underflowed (non-zero there, zero here);
    ``underflow_mass`` is the share of the reference's norm carried by underflowed entries whose reference
    value lies below the format's smallest normal (an exact zero from cancellation among larger values is
    an error, judged by ``rel_err``, not an underflow). The error metrics cover the entries finite in the
    reference; see the module doc for non-finite, all-zero, empty and non-floating tensors."""
    if cand.shape != ref.shape:
        raise ValueError(f"candidate shape {tuple(cand.shape)} differs from the reference's {tuple(ref.shape)}")
    for side, x in (("candidate", cand), ("reference", ref)):
        if not _judgeable_dtype(x):
            raise TypeError(f"the {side} has dtype {x.dtype}: {_DTYPE_RULE}")
    if ref.numel() == 0:
        raise ValueError(f"the reference has no entries (shape {tuple(ref.shape)}): nothing to compare")
    c, r = cand.detach().double().reshape(-1), ref.detach().double().reshape(-1).to(cand.device)
    rf = torch.isfinite(r)
    cf = torch.isfinite(c)
    over = rf & ~cf
    under = rf & (r != 0) & (c == 0)
    mismatch = ~rf & ~((c == r) | (torch.isnan(c) & torch.isnan(r)))  # equal infinities, or NaN and NaN
    d = torch.where(rf & cf, c - r, torch.zeros_like(r))
    rr = torch.where(rf, r, torch.zeros_like(r))
    rel_entry = torch.where(rr != 0, d.abs() / rr.abs(), torch.zeros_like(r))
    stats = torch.stack([
        d.norm(), rr.norm(), d.abs().max(), rel_entry.max(), (d.abs() / ulp(rr, fmt).double()).max(),
        over.sum().double(), under.sum().double(), (rf & (r != 0)).sum().double(), rf.sum().double(),
        torch.where(under & (rr.abs() < fmt.min_normal), rr, torch.zeros_like(rr)).norm(),
        mismatch.sum().double(),
    ]).tolist()
    dn, rn, max_abs, max_rel, ulps, n_over, n_under, n_nonzero, n_finite, lost_norm, n_mismatch = stats
    n_over, n_finite, numel = int(n_over), int(n_finite), int(c.numel())
    m: dict[str, Any] = {"numel": numel}
    if n_finite < numel:
        m.update(ref_nonfinite=numel - n_finite, nonfinite_mismatch=int(n_mismatch))
    if not n_finite:  # nothing finite in the reference: no error metric exists
        m["nonfinite"] = 0
        return m
    if rn == 0:
        m["ref_all_zero"] = True
    rel = math.inf if n_over or (rn == 0 and dn != 0) else (dn / rn if rn > 0 else 0.0)
    m.update({
        "rel_err": rel,
        "max_abs_err": math.inf if n_over else max_abs,
        "ulp_err": math.inf if n_over else ulps,
        "sqnr_db": -math.inf if n_over else (math.inf if dn == 0 else (20 * math.log10(rn / dn) if rn > 0
                                                                       else -math.inf)),
        "nonfinite": n_over,
        "overflow_frac": n_over / n_finite,
        "underflow_frac": n_under / n_nonzero if n_nonzero else 0.0,
        "underflow_mass": lost_norm / rn if rn > 0 else 0.0,
    })
    if n_nonzero:
        m["max_rel_err"] = math.inf if n_over else max_rel
    return m


_DTYPE_RULE = ("only real floating-point outputs are judged against a rounding-error bound; return a float "
               "tensor (an exact count or index belongs in Output.extra)")


def _judgeable_dtype(x: torch.Tensor) -> bool:
    return x.is_floating_point()


def output_problems(out: Output) -> list[str]:
    """Why ``out`` cannot be a reference whatever its values: a value or gradient that is not a tensor,
    not real floating point, or has no entries, or no value, gradient or loss at all."""
    problems = []
    tensors = ([("value", out.value)] if out.value is not None else []) + \
        [(f"gradient {k}", g) for k, g in (out.grads or {}).items()]
    for what, x in tensors:
        if not isinstance(x, torch.Tensor):
            problems.append(f"{what} is a {type(x).__name__}, not a tensor")
        elif not _judgeable_dtype(x):
            problems.append(f"{what} has dtype {x.dtype}: {_DTYPE_RULE}")
    if isinstance(out.value, torch.Tensor) and out.value.numel() == 0:
        problems.append(f"value has no entries (shape {tuple(out.value.shape)})")
    grads = [g for g in (out.grads or {}).values() if isinstance(g, torch.Tensor)]
    if grads and sum(g.numel() for g in grads) == 0:
        problems.append("the gradients have no entries")
    if measures_only(out) and not out.extra:
        problems.append("it holds no value, gradients or loss curve: nothing to compare")
    return problems


def measures_only(out: Output) -> bool:
    """Whether ``out`` holds nothing to compare (no value, gradients or loss curve): with numbers in
    ``extra`` it is a measurement (a device profile), recorded but never judged."""
    return out.value is None and not out.grads and not out.losses


def nonfinite_parts(out: Output) -> list[str]:
    """Each output of ``out`` holding inf/NaN, said with where: ``value: 3 of 8 entries inf/NaN (first at
    (0, 2): inf)``, ``gradient w: ...``, ``loss at steps 2, 3 of 4 (nan, inf)``."""
    parts = []
    tensors = ([("value", out.value)] if out.value is not None else []) + \
        [(f"gradient {k}", g) for k, g in (out.grads or {}).items()]
    for what, x in tensors:
        bad = ~torch.isfinite(x.detach())
        n = int(bad.sum())
        if n:
            first = tuple(int(i) for i in torch.unravel_index(bad.reshape(-1).nonzero()[0, 0], x.shape)) \
                if x.dim() else ()
            parts.append(f"{what}: {n} of {x.numel()} entries inf/NaN (first at {first}: {float(x[first])})")
    steps = [i for i, v in enumerate(out.losses or []) if not math.isfinite(v)]
    if steps:
        shown = ", ".join(str(i) for i in steps[:5]) + (", ..." if len(steps) > 5 else "")
        values = ", ".join(str(out.losses[i]) for i in steps[:5])
        parts.append(f"loss at step{'s' if len(steps) > 1 else ''} {shown} of {len(out.losses)} ({values})")
    return parts


def underflow_by_tensor(cand: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], fmt: Format
                        ) -> dict[str, float]:
    """Per tensor of ``ref`` (and ``cand``), the share of entries non-zero in ``ref`` and zero in ``cand``
    (``tensor_metrics``' ``underflow_frac`` of each); only tensors that lost some. One pass over all the
    tensors, one host sync."""
    keys = [k for k in ref if k in cand]
    _same_shapes(cand, ref, keys)
    if not keys:
        return {}
    c = _flat(cand, keys)
    return _underflow_fracs(c, _flat(ref, keys, c.device), [ref[k].numel() for k in keys], keys)


def _same_shapes(cand: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], keys: list[str]) -> None:
    for k in keys:
        if cand[k].shape != ref[k].shape:
            raise ValueError(f"candidate {k} has shape {tuple(cand[k].shape)}, the reference's is "
                             f"{tuple(ref[k].shape)}")


def _flat(tensors: dict[str, torch.Tensor], keys: list[str], device: torch.device | None = None) -> torch.Tensor:
    """The tensors named ``keys`` end to end, in FP64 (on ``device`` if given)."""
    return torch.cat([tensors[k].detach().reshape(-1).double().to(device) for k in keys])


def _underflow_fracs(c: torch.Tensor, r: torch.Tensor, sizes: list[int], keys: list[str]) -> dict[str, float]:
    """``underflow_by_tensor`` on tensors laid end to end (``sizes`` entries each, named ``keys``)."""
    nonzero = torch.isfinite(r) & (r != 0)
    lost = nonzero & (c == 0)
    seg = torch.repeat_interleave(torch.arange(len(sizes), device=c.device),
                                  torch.tensor(sizes, device=c.device))
    counts = torch.zeros(2, len(sizes), dtype=torch.float64, device=c.device)
    counts[0].index_add_(0, seg, lost.double())
    counts[1].index_add_(0, seg, nonzero.double())
    n_lost, n_nonzero = counts.tolist()
    return {k: a / b for k, a, b in zip(keys, n_lost, n_nonzero) if a > 0}


def _grads_metrics(cand: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], fmt: Format) -> dict[str, Any]:
    missing = sorted(set(ref) - set(cand))
    if missing:
        raise ValueError(f"candidate has no gradient for {', '.join(missing)}")
    keys = list(ref)
    _same_shapes(cand, ref, keys)
    c = _flat(cand, keys)
    r = _flat(ref, keys, c.device)
    allm = tensor_metrics(c, r, fmt)
    lost = _underflow_fracs(c, r, [ref[k].numel() for k in keys], keys)
    out = {f"grad_{k}": allm[k] for k in ("rel_err", "nonfinite", "underflow_frac", "overflow_frac", "ref_nonfinite",
                                          "nonfinite_mismatch", "ref_all_zero") if k in allm}
    out["grad_underflow_by_tensor"] = lost
    return out


def _same(c: float, r: float) -> bool:
    """The same number, counting NaN as equal to NaN (how a non-finite reference entry is matched)."""
    return c == r or (math.isnan(c) and math.isnan(r))


def _step_divergence(c: float, r: float) -> float:
    """|c - r| / |r| at one step with a finite reference loss (0 or inf against a reference of exactly 0)."""
    if not math.isfinite(c):
        return math.inf
    if r == 0:
        return 0.0 if c == 0 else math.inf
    return abs(c - r) / abs(r)


def _loss_metrics(cand: list[float], ref: list[float]) -> dict[str, Any]:
    """Loss-curve metrics over the steps both curves have (see the module doc)."""
    n = min(len(cand), len(ref))
    if n == 0:
        return {"loss_steps": len(cand), "loss_divergence": math.inf}
    finite = [i for i in range(n) if math.isfinite(ref[i])]
    m: dict[str, Any] = {"loss_nonfinite": sum(1 for i in finite if not math.isfinite(cand[i])),
                         "loss_steps": len(cand), "final_loss": cand[n - 1], "final_loss_ref": ref[n - 1]}
    if finite:
        m["loss_divergence"] = max(_step_divergence(cand[i], ref[i]) for i in finite)
    if math.isfinite(ref[n - 1]) and ref[n - 1] != 0:
        m["final_loss_ratio"] = cand[n - 1] / ref[n - 1]
    if len(finite) < n:
        m["loss_ref_nonfinite"] = n - len(finite)
        m["loss_nonfinite_mismatch"] = sum(1 for i in range(n)
                                           if not math.isfinite(ref[i]) and not _same(cand[i], ref[i]))
    return m


def _without_zeros(cand: Output, ref: Output, fmt: Format, zeros: torch.Tensor) -> dict[str, Any]:
    """Drift (``rel_err`` of the net update) and per-tensor gradient underflow over the entries whose FP32
    gradient is significant: a computational zero (rounding noise of a gradient that is zero in exact
    arithmetic, such as a key bias's under softmax) has no direction for any precision to get right, yet
    Adam turns it into a full-size step of random sign. ``rel_err_all`` keeps the drift over every entry."""
    out: dict[str, Any] = {"computational_zeros": int(zeros.sum())}
    if not out["computational_zeros"]:
        return out
    keep = ~zeros.reshape(-1)
    if ref.value is not None and cand.value is not None and ref.value.numel() == keep.numel():
        out["rel_err_all"] = tensor_metrics(cand.value, ref.value, fmt)["rel_err"]
        out["rel_err"] = tensor_metrics(cand.value.reshape(-1)[keep.to(cand.value.device)],
                                        ref.value.reshape(-1)[keep.to(ref.value.device)], fmt)["rel_err"]
    if ref.grads and cand.grads:
        keys = list(ref.grads)
        sig = _flat(ref.grads, keys) * keep.to(torch.float64)
        out["grad_underflow_by_tensor"] = _underflow_fracs(_flat(cand.grads, keys, sig.device), sig,
                                                           [ref.grads[k].numel() for k in keys], keys)
    return out


def _lost_excess(cand: dict[str, Any], ref: dict[str, Any]) -> float:
    """The share of updates lost beyond the reference's, from the exact counts where both give them
    (``updates_lost_of``: [lost, with a gradient]): 56/100 - 55/100 is exactly the 1% budget, while the
    difference of the rounded shares, 0.010000000000000009, would exceed it."""
    counts = [d.get("updates_lost_of") for d in (cand, ref)]
    if all(isinstance(c, list) and len(c) == 2 and c[1] for c in counts):
        return float(Fraction(*counts[0]) - Fraction(*counts[1]))
    return cand["updates_lost"] - ref["updates_lost"]


def compare(cand: Output, ref: Output, fmt: Format) -> dict[str, Any]:
    """All metrics of ``cand`` against ``ref`` (what both provide)."""
    m: dict[str, Any] = {}
    if ref.value is not None:
        if cand.value is None:
            raise ValueError("scenario returned no value where the reference has one")
        m.update(tensor_metrics(cand.value, ref.value, fmt))
    if ref.grads:
        if not cand.grads:
            raise ValueError("scenario returned no gradients where the reference has them")
        m.update(_grads_metrics(cand.grads, ref.grads, fmt))
    zeros = ref.extra.get("computational_zeros")
    if zeros is not None:  # training runs: entries whose FP32 gradient has no significant digit (harness.judge.sensitivity)
        m.update(_without_zeros(cand, ref, fmt, zeros))
    if ref.losses:
        if cand.losses is None:
            raise ValueError("scenario returned no loss curve where the reference has one")
        m.update(_loss_metrics(cand.losses, ref.losses))
    if cand.trace is not None:
        m["scaler"] = cand.trace.as_dict()
    if "updates_lost" in cand.extra and "updates_lost" in ref.extra:  # training runs (harness.models.user_model)
        m["updates_lost_excess"] = _lost_excess(cand.extra, ref.extra)
    return m
