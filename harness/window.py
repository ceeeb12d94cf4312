"""The feasible FP16 loss-scale window, computed from FP32 reference gradients.

Multiplying gradients by S keeps them finite while ``S * max|g| <= fmt.max``, so ``S_hi = fmt.max / max|g|``.
Round-to-nearest flushes ``S*|g|`` to zero below half the smallest subnormal, so the fraction of
non-zero gradients lost at scale S is the fraction with ``|g| < fmt.smallest / (2 S)``; the smallest
scale that loses at most ``budget`` of them is ``S_lo = fmt.smallest / (2 q)`` where ``q`` is the
``budget``-quantile of the non-zero |g|. A tensor (or a model) can be trained with one loss scale
only if ``S_lo <= S_hi``; when the per-tensor windows do not intersect, no single loss scale works,
and the two tensors that pull apart are named.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .formats import FORMATS, Format
from .scaling import format_number

__all__ = ["TensorWindow", "Window", "tensor_window", "scale_window"]


@dataclass(frozen=True)
class TensorWindow:
    name: str
    lo: float  # smallest scale that keeps the lost fraction within budget (0 if none is lost at S=1/inf)
    hi: float  # largest scale that does not overflow (inf for an all-zero tensor)
    max_abs: float
    min_nonzero: float

    @property
    def empty(self) -> bool:
        return self.lo > self.hi

    def as_dict(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "max_abs": self.max_abs, "min_nonzero": self.min_nonzero}


@dataclass
class Window:
    per_tensor: dict[str, TensorWindow] = field(default_factory=dict)
    lo: float = 0.0
    hi: float = math.inf
    lo_tensor: str | None = None
    hi_tensor: str | None = None
    budget: float = 0.01
    format: str = "fp16"

    @property
    def empty(self) -> bool:
        return self.lo > self.hi

    def describe(self) -> str:
        if not self.per_tensor:
            return "no gradients"
        if self.empty:
            return (f"no single loss scale works: needs S >= {self.lo:.2g} for {self.lo_tensor} "
                    f"(its gradients reach down to {self.per_tensor[self.lo_tensor].min_nonzero:.2g}), "
                    f"S <= {self.hi:.2g} for {self.hi_tensor} (max |g| {self.per_tensor[self.hi_tensor].max_abs:.2g})")
        return f"{self.format} loss scales from {_n(self.lo)} to {_n(self.hi)} work (budget {100 * self.budget:g}% lost)"

    def as_dict(self) -> dict:
        return {"format": self.format, "budget": self.budget, "lo": self.lo, "hi": self.hi,
                "lo_tensor": self.lo_tensor, "hi_tensor": self.hi_tensor, "empty": self.empty,
                "describe": self.describe(),
                "per_tensor": {k: w.as_dict() for k, w in self.per_tensor.items()}}


def _n(x: float) -> str:
    return format_number(2.0 ** round(math.log2(x))) if 0 < x < math.inf else format_number(x)


def tensor_window(name: str, g: torch.Tensor, fmt: Format = FORMATS["fp16"], budget: float = 0.01) -> TensorWindow:
    a = g.detach().abs().double().reshape(-1)
    a = a[torch.isfinite(a)]
    nz = a[a > 0]
    if nz.numel() == 0:
        return TensorWindow(name, 0.0, math.inf, 0.0, 0.0)
    mx = float(nz.max())
    hi = fmt.max / mx
    # lost at scale S: |g| * S < smallest/2. Allow at most floor(budget * count) losses.
    k = int(math.floor(budget * nz.numel()))
    srt = torch.sort(nz).values
    q = float(srt[k]) if k < srt.numel() else float(srt[-1])
    lo = fmt.smallest / (2.0 * q)
    return TensorWindow(name, lo, hi, mx, float(srt[0]))


def scale_window(grads: dict[str, torch.Tensor], fmt: Format = FORMATS["fp16"], budget: float = 0.01,
                 whole: bool = True) -> Window:
    """Per-tensor windows and their intersection (``whole``: also the window of all gradients pooled)."""
    w = Window(budget=budget, format=fmt.name)
    for name, g in grads.items():
        w.per_tensor[name] = tensor_window(name, g, fmt, budget)
    live = [t for t in w.per_tensor.values() if t.max_abs > 0]
    if live:
        lo_t = max(live, key=lambda t: t.lo)
        hi_t = min(live, key=lambda t: t.hi)
        w.lo, w.lo_tensor, w.hi, w.hi_tensor = lo_t.lo, lo_t.name, hi_t.hi, hi_t.name
    if whole and len(grads) > 1:
        pooled = torch.cat([g.detach().reshape(-1).double() for g in grads.values()])
        w.per_tensor["(all)"] = tensor_window("(all)", pooled, fmt, budget)
    return w
