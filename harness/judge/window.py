"""The feasible loss-scale window, computed from FP32 reference gradients.

Multiplying the gradients by a loss scale S and rounding them to a low-precision format (FP16 by
default) with round-to-nearest-even loses a value in two ways, and each gives one end of the window:

* **overflow**: ``S*|g|`` rounds to inf once it reaches ``max + ulp(max)/2`` (65520 for FP16; the tie
  goes to inf). The largest gradient stays finite for every ``S < hi = (max + ulp(max)/2) / max|g|``.
* **underflow**: ``S*|g|`` rounds to zero while it is at most half the smallest subnormal (``2^-25`` for
  FP16; exactly half ties to zero, the even neighbour). A tensor may lose at most ``budget`` of its
  non-zero gradients: with ``q`` the ``(floor(budget*N)+1)``-th smallest non-zero ``|g|``, every
  ``S > lo = (smallest/2) / q`` keeps all but the budget. ``floor(budget*N)`` is exact (:func:`budget_count`):
  a budget of 0.29 of 100 values allows 29, not the 28 that binary floating point gives.

Gradients that are already inf/NaN in FP32 stay so at every loss scale. They are counted (``nonfinite``),
the window of the finite values is still computed, and the description starts with them.

So the scales that work form the open interval ``(lo, hi)``. Dynamic loss scalers only ever use powers
of two (growth 2, backoff 1/2 from 2^16), so the window also reports ``lo_pow2``/``hi_pow2``, the
smallest and largest power of two inside it (exact, inclusive). With gradients spanning 2^-40..2^-10,
``lo = 2^15`` exactly but S = 2^15 itself maps 2^-40 to 2^-25, which ties to zero: ``lo_pow2 = 2^16``;
``hi = 65520*2^10`` and ``hi_pow2 = 2^25``.

A model can be trained with one loss scale only if every tensor can: the model's window is the
intersection of the per-tensor windows. When it is empty, no single loss scale works, and the two
tensors that pull apart are named with both numbers::

    no single loss scale works: needs S > 5.6e+06 for a (...), S < 6.1e+04 for b (...)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from ..values.formats import FORMATS, Format
from ..core.scaling import format_number

__all__ = ["TensorWindow", "Window", "tensor_window", "scale_window", "pow2_inside", "pow2_above", "pow2_below",
           "budget_count"]


def budget_count(budget: float, n: int) -> int:
    """How many of ``n`` values a ``budget`` (a fraction) allows to lose: ``floor(budget * n)``, computed
    exactly on the decimal the budget was written as (``repr``, the shortest spelling that reads back to the
    same float), not on its binary approximation: 0.29 of 100 is 29 (``0.29 * 100`` is 28.999999999999996).

    >>> budget_count(0.29, 100), budget_count(0.01, 250), budget_count(0.0, 7)
    (29, 2, 0)
    """
    if not 0 <= budget < 1:
        raise ValueError(f"underflow budget must be in [0, 1), got {budget}")
    return math.floor(Fraction(repr(float(budget))) * n)


def pow2_above(x: float) -> float:
    """The smallest power of two strictly above ``x > 0``. Exact: ``x = m * 2^e`` with m in [0.5, 1)."""
    return math.ldexp(1.0, math.frexp(x)[1])


def pow2_below(x: float) -> float:
    """The largest power of two strictly below ``x > 0``: 2^(e-1), or 2^(e-2) when x is itself 2^(e-1)."""
    m, e = math.frexp(x)
    return math.ldexp(1.0, e - 2 if m == 0.5 else e - 1)


def pow2_inside(lo: float, hi: float) -> tuple[float | None, float | None]:
    """(smallest, largest) power of two strictly inside ``(lo, hi)``; (None, None) if there is none
    (or the interval is unbounded)."""
    if not (0 < lo < hi < math.inf):
        return None, None
    first, last = pow2_above(lo), pow2_below(hi)
    return (first, last) if first <= last else (None, None)


@dataclass(frozen=True)
class TensorWindow:
    """Loss scales S in the open interval (lo, hi) keep one tensor's gradients within budget."""

    name: str
    lo: float  # S must exceed this to keep all but the budget from flushing to zero (0: nothing to lose)
    hi: float  # S must stay below this for the largest |g| not to overflow (inf for an all-zero tensor)
    max_abs: float  # of the finite values
    min_nonzero: float
    nonfinite: int = 0  # values already inf/NaN in FP32: no loss scale makes them finite
    size: int = 0  # all its values

    @property
    def empty(self) -> bool:
        return self.lo >= self.hi

    def as_dict(self) -> dict:
        lo2, hi2 = pow2_inside(self.lo, self.hi)
        return {"lo": self.lo, "hi": self.hi, "lo_pow2": lo2, "hi_pow2": hi2, "max_abs": self.max_abs,
                "min_nonzero": self.min_nonzero, "nonfinite": self.nonfinite}


@dataclass
class Window:
    """Per-tensor windows and the model's (their intersection); ``(all)`` pools every gradient."""

    per_tensor: dict[str, TensorWindow] = field(default_factory=dict)
    lo: float = 0.0
    hi: float = math.inf
    lo_tensor: str | None = None
    hi_tensor: str | None = None
    budget: float = 0.01
    format: str = "fp16"

    @property
    def empty(self) -> bool:
        return self.lo >= self.hi

    @property
    def nonfinite(self) -> dict[str, int]:
        """Tensors (not the pooled ``(all)``) whose FP32 gradients hold inf/NaN, with how many."""
        return {n: t.nonfinite for n, t in self.per_tensor.items() if t.nonfinite and n != "(all)"}

    @property
    def pow2(self) -> tuple[float | None, float | None]:
        """The smallest and largest power-of-two loss scale that work for every tensor."""
        return pow2_inside(self.lo, self.hi)

    def describe(self) -> str:
        """One line: which loss scales work, or why none does; non-finite FP32 gradients first."""
        bad = self.nonfinite
        if bad:
            where = ", ".join(f"{n} ({k} of {self.per_tensor[n].size})" for n, k in bad.items())
            head = f"FP32 gradients already inf/NaN in {where}: no loss scale makes them finite"
            return head if self.lo_tensor is None else f"{head}; of the finite ones, {self._describe_finite()}"
        return self._describe_finite()

    def _describe_finite(self) -> str:
        if not self.per_tensor:
            return "no gradients"
        if self.lo_tensor is None:
            return "all gradients are zero: any loss scale works"
        if self.empty:
            lo_t, hi_t = self.per_tensor[self.lo_tensor], self.per_tensor[self.hi_tensor]
            return (f"no single loss scale works: needs S > {self.lo:.2g} for {self.lo_tensor} "
                    f"(its gradients reach down to {lo_t.min_nonzero:.2g}), "
                    f"S < {self.hi:.2g} for {self.hi_tensor} (max |g| {hi_t.max_abs:.2g})")
        lo2, hi2 = self.pow2
        budget = f"at most {100 * self.budget:g}% of non-zero gradients flushed"
        if lo2 is None:
            return (f"{self.format} loss scales in ({self.lo:.3g}, {self.hi:.3g}) work ({budget}); "
                    "no power of two lies inside, so no dynamic scaler can find one")
        return f"{self.format} loss scales from {format_number(lo2)} to {format_number(hi2)} work ({budget})"

    def as_dict(self) -> dict:
        lo2, hi2 = self.pow2
        return {"format": self.format, "budget": self.budget, "lo": self.lo, "hi": self.hi,
                "lo_pow2": lo2, "hi_pow2": hi2, "lo_tensor": self.lo_tensor, "hi_tensor": self.hi_tensor,
                "empty": self.empty, "nonfinite": sum(self.nonfinite.values()), "describe": self.describe(),
                "per_tensor": {k: w.as_dict() for k, w in self.per_tensor.items()}}


def tensor_window(name: str, g: torch.Tensor, fmt: Format = FORMATS["fp16"], budget: float = 0.01) -> TensorWindow:
    """The window of one tensor's finite values (see module doc), with the count of its inf/NaN ones."""
    a = g.detach().abs().double().reshape(-1)
    finite = torch.isfinite(a)
    size = a.numel()
    bad = size - int(finite.sum())
    nz = a[finite & (a > 0)]
    k = budget_count(budget, nz.numel())  # how many values may be lost; the (k+1)-th must be kept
    if nz.numel() == 0:
        return TensorWindow(name, 0.0, math.inf, 0.0, 0.0, bad, size)
    srt = torch.sort(nz).values
    q, mx = float(srt[k]), float(srt[-1])
    return TensorWindow(name, (fmt.smallest / 2) / q, fmt.overflow_threshold / mx, mx, float(srt[0]), bad, size)


def scale_window(grads: dict[str, torch.Tensor], fmt: Format = FORMATS["fp16"], budget: float = 0.01) -> Window:
    """Per-tensor windows, their intersection, and (for several tensors) the window of all gradients
    pooled, under ``(all)``."""
    w = Window(budget=budget, format=fmt.name)
    for name, g in grads.items():
        w.per_tensor[name] = tensor_window(name, g, fmt, budget)
    live = [t for t in w.per_tensor.values() if t.max_abs > 0]
    if live:
        lo_t = max(live, key=lambda t: t.lo)
        hi_t = min(live, key=lambda t: t.hi)
        w.lo, w.lo_tensor, w.hi, w.hi_tensor = lo_t.lo, lo_t.name, hi_t.hi, hi_t.name
    if len(grads) > 1:
        pooled = torch.cat([g.detach().reshape(-1).double() for g in grads.values()])
        w.per_tensor["(all)"] = tensor_window("(all)", pooled, fmt, budget)
    return w
