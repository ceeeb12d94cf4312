"""The reference a case is judged against: the scenario under FP32 with TF32 off.

Computed once per (scenario, params, seed, device) and reused by every strategy. The same case is
also run in FP64; where FP32's own error against FP64 exceeds its bound (FP32 is then not
trustworthy for this case), FP64 becomes the reference and the record says so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .execution import FP64, Execution
from .formats import FORMATS
from .metrics import compare
from .scenario import Case, Output
from .strategy import PRESETS
from .tolerance import bound, describe
from .window import scale_window

__all__ = ["Reference", "compute_reference", "ReferenceCache"]


@dataclass
class Reference:
    output: Output
    format: str  # "fp32" or "fp64"
    check: dict[str, Any] = field(default_factory=dict)
    window: dict[str, Any] | None = None  # FP16 loss-scale window of the reference gradients


def _deterministic() -> None:
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def compute_reference(case: Case, inputs: dict, device: torch.device) -> Reference:
    """FP32 reference (TF32 off), checked against FP64."""
    _deterministic()
    s, p = case.scenario, case.params
    out32 = s.run(Execution(PRESETS["fp32"], device), inputs, p)
    out64 = s.run(FP64(device), inputs, p)
    for out in (out32, out64):
        if not isinstance(out, Output):
            raise TypeError(f"scenario {s.name}.run returned {type(out).__name__}, expected harness.scenario.Output")
    fp32 = FORMATS["fp32"]
    m = compare(out32, out64, fp32)
    n = s.n(p)
    b = bound(fp32, n, out64.kappa)
    worst = max((m.get(k, 0.0) for k in ("rel_err", "grad_rel_err", "loss_divergence")), default=0.0)
    check = {"fp32_vs_fp64": worst, "bound": b}
    window = _window(out32)
    if worst > b or m.get("nonfinite") or m.get("grad_nonfinite"):
        check["reason"] = (f"fp32 rel_err {worst:.2e} > {b:.2e} = {describe(fp32, n, out64.kappa)}: "
                           "FP64 is the reference")
        return Reference(out64, "fp64", check, window)
    return Reference(out32, "fp32", check, window)


MAX_WINDOW_TENSORS = 64


def _window(out: Output) -> dict[str, Any] | None:
    if not out.grads:
        return None
    w = scale_window(out.grads).as_dict()
    w["log2_hist"] = log2_histogram(out.grads)
    if len(w["per_tensor"]) > MAX_WINDOW_TENSORS:  # keep records small for large models
        keep = sorted(w["per_tensor"].items(), key=lambda kv: -kv[1]["lo"])[:MAX_WINDOW_TENSORS]
        w["per_tensor"] = dict(keep)
        w["per_tensor_truncated"] = True
    return w


#: Formats whose ranges a gradient histogram is drawn against (recorded with it: reports import no torch).
HIST_FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")


def log2_histogram(grads: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Counts of the non-zero finite gradient entries per binade ``floor(log2|g|)`` (all tensors pooled),
    the zero count, and the ranges of :data:`HIST_FORMATS`: what the gradient histogram of a report draws."""
    a = torch.cat([g.detach().abs().double().reshape(-1) for g in grads.values()])
    a = a[torch.isfinite(a)]
    nz = a[a > 0]
    ranges = {f: {"smallest": FORMATS[f].smallest, "min_normal": FORMATS[f].min_normal, "max": FORMATS[f].max}
              for f in HIST_FORMATS}
    if nz.numel() == 0:
        return {"lo": 0, "counts": [], "zeros": int(a.numel()), "formats": ranges}
    e = torch.frexp(nz).exponent.long() - 1  # exact floor(log2|g|): |g| = m * 2^exponent, m in [0.5, 1)
    lo = int(e.min())
    counts = torch.bincount(e - lo).tolist()
    return {"lo": lo, "counts": counts, "zeros": int(a.numel() - nz.numel()), "formats": ranges}


class ReferenceCache:
    """References by case key and device, with counts of computations and reuses and the seconds spent.

    A reference that fails is remembered too: every strategy of that case gets the same error
    without recomputing it."""

    def __init__(self) -> None:
        self._refs: dict[tuple[str, str], Reference | Exception] = {}
        self.computed = 0
        self.reused = 0
        self.seconds = 0.0

    def get(self, case: Case, inputs: dict, device: torch.device) -> Reference:
        key = (case.key, str(device))
        if key in self._refs:
            self.reused += 1
            hit = self._refs[key]
            if isinstance(hit, Exception):
                raise RuntimeError(f"the reference of this case failed: {type(hit).__name__}: {hit}")
            return hit
        t0 = time.perf_counter()
        try:
            ref = compute_reference(case, inputs, device)
        except Exception as exc:
            self._refs[key] = exc
            raise
        finally:
            self.computed += 1
            self.seconds += time.perf_counter() - t0
        self._refs[key] = ref
        return ref

    def drop(self, case: Case, device: torch.device) -> None:
        self._refs.pop((case.key, str(device)), None)
