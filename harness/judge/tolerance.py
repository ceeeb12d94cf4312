"""The rounding-error model every verdict's bound comes from.

For a computation whose longest chain of dependent roundings has length ``n`` (a sum of n terms, an
inner product of length n, a softmax row of n entries), done in a format with unit roundoff ``u``:

* **round to nearest** (CPUs, and FP32 accumulation): rounding errors behave like independent,
  mean-zero random variables, and with probability at least ``1 - delta`` the relative error
  (normwise, against the sum of magnitudes) is below
  ``gamma~(n) = exp(lambda*sqrt(n)*u + n*u^2/(1-u)) - 1  ~  lambda*sqrt(n)*u``,
  with ``lambda = sqrt(2*ln(2n/delta))`` (Higham and Mary, SIAM J. Sci. Comput. 2019, Thm 2.4).
* **truncating accumulation** (Tensor Cores align products to the largest exponent and round toward
  zero): on same-sign data the errors share a sign and add up linearly, so the deterministic bound
  ``gamma(n) = n*u/(1-n*u)`` is the honest one.

A scenario multiplies the bound by ``kappa``, the condition number of its problem on its inputs
(``sum|x| / |sum x|`` for a sum, the logit range for a softmax...), and may declare a factor with a
reason. The probabilistic model needs mean-zero rounding errors. A recursive sum of same-sign data
loses that once its running total reaches about 1/u times its terms (near n*u = 2 for terms of one
magnitude: an FP16 sum of terms below 1 stops at 2^11), long before lambda*sqrt(n)*u nears 1; from
there every addition rounds down, the bound fails, and the verdict rightly says ``diverged``. A
result without one correct leading bit is wrong whatever the model says, so bounds are capped at
``CAP = 1/2``. The model is validated, with measured numbers, in docs/tolerance.md.
"""
from __future__ import annotations

import math
import sys

from ..values.formats import Format

__all__ = ["DELTA", "CAP", "confidence_lambda", "gamma_probabilistic", "gamma_worst_case", "bound", "describe"]

#: Probability with which the probabilistic bound may be exceeded.
DELTA = 0.01
#: No bound is looser than this: a relative error of 1/2 leaves no correct leading bit.
CAP = 0.5
#: The largest x whose exp(x) is a finite double.
_EXP_MAX = math.log(sys.float_info.max)


def confidence_lambda(n: int, delta: float = DELTA) -> float:
    """lambda such that the probabilistic bound holds with probability >= 1 - delta for length n."""
    return math.sqrt(2.0 * math.log(2.0 * max(n, 1) / delta))


def gamma_probabilistic(n: int, u: float, delta: float = DELTA) -> float:
    """The probabilistic bound; inf where it passes the largest float (FP4's u = 1/4 with n in the
    thousands: exp(784)), as :func:`gamma_worst_case` is inf past n*u = 1."""
    lam = confidence_lambda(n, delta)
    x = lam * math.sqrt(n) * u + n * u * u / (1.0 - u)
    return math.inf if x > _EXP_MAX else math.expm1(x)


def gamma_worst_case(n: int, u: float) -> float:
    nu = n * u
    return math.inf if nu >= 1 else nu / (1.0 - nu)


def bound(fmt: Format, n: int, kappa: float = 1.0, factor: float = 1.0, truncating: bool = False) -> float:
    """The error bound a verdict compares ``rel_err`` with (capped at :data:`CAP`)."""
    g = gamma_worst_case(n, fmt.u) if truncating else gamma_probabilistic(n, fmt.u)
    return min(CAP, max(kappa, 1.0) * factor * g)


def describe(fmt: Format, n: int, kappa: float = 1.0, factor: float = 1.0, truncating: bool = False) -> str:
    """How the bound was formed, for reasons: ``kappa*lambda*sqrt(n)*u`` with the numbers filled in."""
    u = f"2^{int(round(math.log2(fmt.u)))}"
    k = f"{kappa:.3g}*" if kappa > 1 else ""
    f = f"{factor:g}*" if factor != 1 else ""
    if truncating:
        core = f"n*u/(1-n*u), n={n}, u={u} ({fmt.name}, truncating)"
    else:
        core = f"{confidence_lambda(n):.2f}*sqrt({n})*{u} ({fmt.name})"
    b = bound(fmt, n, kappa, factor, truncating)
    return f"{k}{f}{core}" + (" capped at 1/2" if b >= CAP else "")
