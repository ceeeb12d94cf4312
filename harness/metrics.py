"""Error metrics of a candidate output against its reference.

Every comparison is made in FP64 on the device where both live, over the entries where the
reference is finite. One host sync per tensor pair.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .formats import Format
from .scenario import Output

__all__ = ["tensor_metrics", "compare", "ulp", "underflow_by_tensor"]


def ulp(y: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Spacing of ``fmt`` at |y| (subnormal spacing below the smallest normal)."""
    a = y.abs().clamp_min(fmt.min_normal)
    e = torch.frexp(a).exponent.to(a.dtype) - 1  # exact; CUDA's float64 log2 misses powers of two
    e = torch.where(torch.isfinite(a), e, torch.log2(a)).clamp(max=fmt.emax)
    return torch.exp2(e - fmt.fraction_bits)


def tensor_metrics(cand: torch.Tensor, ref: torch.Tensor, fmt: Format) -> dict[str, float]:
    """rel_err (normwise), max_abs_err, max_rel_err, ulp_err, sqnr_db, and counts of entries that
    overflowed (finite in the reference, inf/NaN here) or underflowed (non-zero there, zero here);
    ``underflow_mass`` is the share of the reference's norm carried by underflowed entries whose reference
    value lies below the format's smallest normal (an exact zero from cancellation among larger values is
    an error, judged by ``rel_err``, not an underflow)."""
    if cand.shape != ref.shape:
        raise ValueError(f"candidate shape {tuple(cand.shape)} differs from the reference's {tuple(ref.shape)}")
    c, r = cand.detach().double().reshape(-1), ref.detach().double().reshape(-1).to(cand.device)
    rf = torch.isfinite(r)
    cf = torch.isfinite(c)
    over = rf & ~cf
    under = rf & (r != 0) & (c == 0)
    d = torch.where(rf & cf, c - r, torch.zeros_like(r))
    rr = torch.where(rf, r, torch.zeros_like(r))
    rel_entry = torch.where(rr != 0, d.abs() / rr.abs(), torch.zeros_like(r))
    stats = torch.stack([
        d.norm(), rr.norm(), d.abs().max() if d.numel() else d.new_zeros(()),
        rel_entry.max() if d.numel() else d.new_zeros(()),
        (d.abs() / ulp(rr, fmt).double()).max() if d.numel() else d.new_zeros(()),
        over.sum().double(), under.sum().double(), (rf & (r != 0)).sum().double(), rf.sum().double(),
        torch.where(under & (rr.abs() < fmt.min_normal), rr, torch.zeros_like(rr)).norm(),
    ]).tolist()
    dn, rn, max_abs, max_rel, ulps, n_over, n_under, n_nonzero, n_finite, lost_norm = stats
    n_over, n_under = int(n_over), int(n_under)
    rel = math.inf if n_over else (dn / rn if rn > 0 else (0.0 if dn == 0 else math.inf))
    return {
        "rel_err": rel,
        "max_abs_err": math.inf if n_over else max_abs,
        "max_rel_err": math.inf if n_over else max_rel,
        "ulp_err": math.inf if n_over else ulps,
        "sqnr_db": (math.inf if dn == 0 else 20 * math.log10(rn / dn)) if (rn > 0 and not n_over) else -math.inf,
        "nonfinite": n_over,
        "overflow_frac": n_over / n_finite if n_finite else 0.0,
        "underflow_frac": n_under / n_nonzero if n_nonzero else 0.0,
        "underflow_mass": lost_norm / rn if rn > 0 else 0.0,
        "numel": int(c.numel()),
    }


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
    return {"grad_rel_err": allm["rel_err"], "grad_nonfinite": allm["nonfinite"],
            "grad_underflow_frac": allm["underflow_frac"], "grad_overflow_frac": allm["overflow_frac"],
            "grad_underflow_by_tensor": lost}


def _loss_metrics(cand: list[float], ref: list[float]) -> dict[str, Any]:
    n = min(len(cand), len(ref))
    if n == 0:
        return {"loss_steps": len(cand)}
    bad = sum(1 for x in cand if not math.isfinite(x))
    div = max((abs(c - r) / max(abs(r), 1e-30) if math.isfinite(c) else math.inf)
              for c, r in zip(cand[:n], ref[:n]))
    fin = cand[n - 1] / ref[n - 1] if ref[n - 1] != 0 else math.inf
    return {"loss_divergence": div, "final_loss_ratio": fin, "loss_nonfinite": bad, "loss_steps": len(cand),
            "final_loss": cand[n - 1], "final_loss_ref": ref[n - 1]}


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
    if zeros is not None:  # training runs: entries whose FP32 gradient has no significant digit (harness.sensitivity)
        m.update(_without_zeros(cand, ref, fmt, zeros))
    if ref.losses and cand.losses is not None:
        m.update(_loss_metrics(cand.losses, ref.losses))
    if cand.trace is not None:
        m["scaler"] = cand.trace.as_dict()
    if "updates_lost" in cand.extra and "updates_lost" in ref.extra:  # training runs (harness.user_model)
        m["updates_lost_excess"] = cand.extra["updates_lost"] - ref.extra["updates_lost"]
    return m
