"""Validation of the rounding-error model of harness.judge.tolerance against emulated recursive summation.

For each format and length, DRAWS independent vectors of same-sign data (uniform on [0, 1), rounded to
the format) are summed left to right with every partial sum rounded to the format, vectorised across
draws. The error is measured as |s_hat - s| / sum|x| against the exact sum.

Exactness of the emulation: the data are multiples of 2^-24 below 1 and the sums stay below 2^15, so
every FP64 addition and the FP64 reference sum are exact (<= 39 significant bits). Round to nearest is
that exact sum rounded to FP32 and then to the format; this double rounding is innocuous because FP32's
24 bits are at least 2p+2 for FP16 (p=11) and BF16 (p=8) (Figueroa 1995). Round toward zero truncates
the FP64 bit pattern to p bits (all values are positive).

``python tests/test_tolerance.py`` prints the table quoted in docs/tolerance.md.
"""
from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import pytest
import torch

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness.values.formats import FORMATS, Format, quantize  # noqa: E402
from harness.judge.tolerance import (CAP, DELTA, bound, confidence_lambda, describe, gamma_probabilistic,  # noqa: E402
                               gamma_worst_case)

DRAWS = 1000
#: Lengths per format: powers of two up to n*u = 2 where the bound is not capped. For same-sign data
#: the running sum reaches 1/u (times the mean) near n*u = 2, and from there on it stagnates (see
#: test_stagnation_...). BF16 at n = 512 (n*u = 2) has gamma 0.54, capped at 1/2: see the docs' table.
COVERAGE = {"fp16": (16, 128, 1024, 2048, 4096), "bf16": (16, 64, 128, 256), "fp32": (16, 1024, 16384)}
#: The bound is required to be within a factor of ten of the p99 for n*u <= 1/2 (see docs/tolerance.md
#: for n*u = 1, where the measured factor is about 10.1).
TIGHT = {"fp16": (16, 128, 1024), "bf16": (16, 64, 128), "fp32": (16, 1024, 16384)}
#: Truncation needs n*u < 1 for its worst-case bound to be finite.
TRUNCATING = {"fp16": (16, 64, 256, 1024), "bf16": (4, 16, 64), "fp32": (16, 256, 4096)}


def _data(fmt: Format, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * seed + n)
    return quantize(torch.rand(DRAWS, n, generator=g), fmt).double()


def _round_nearest(t: torch.Tensor, fmt: Format) -> torch.Tensor:
    return t.float().double() if fmt.name == "fp32" else quantize(t.float(), fmt).double()


def _round_toward_zero(t: torch.Tensor, fmt: Format) -> torch.Tensor:
    drop = 52 - fmt.fraction_bits
    return ((t.view(torch.int64) >> drop) << drop).view(torch.float64)


def recursive_sum(x: torch.Tensor, fmt: Format, truncate: bool = False) -> torch.Tensor:
    """Row sums of ``x`` (draws x n) accumulated left to right, each partial sum rounded to ``fmt``."""
    rnd = _round_toward_zero if truncate else _round_nearest
    s = x[:, 0].clone()
    for i in range(1, x.shape[1]):
        s = rnd(s + x[:, i], fmt)
    return s


@functools.lru_cache(maxsize=None)
def errors(name: str, n: int, truncate: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normwise errors, computed sums, exact sums) over DRAWS draws."""
    fmt = FORMATS[name]
    x = _data(fmt, n)
    exact = x.sum(dim=1)
    s_hat = recursive_sum(x, fmt, truncate)
    return (s_hat - exact).abs() / x.abs().sum(dim=1), s_hat, exact


def _cases(table: dict[str, tuple[int, ...]]) -> list[tuple[str, int]]:
    return [(name, n) for name, ns in table.items() for n in ns]


@pytest.mark.parametrize("name,n", _cases(COVERAGE))
def test_probabilistic_bound_holds_for_at_least_1_minus_delta_of_draws(name: str, n: int) -> None:
    fmt = FORMATS[name]
    assert confidence_lambda(n) * math.sqrt(n) * fmt.u < 1  # inside the domain the issue states
    err, _, _ = errors(name, n)
    b = bound(fmt, n)
    assert b == gamma_probabilistic(n, fmt.u) < CAP
    held = float((err <= b).double().mean())
    assert held >= 1 - DELTA, f"{name} n={n}: bound {b:.3e} held for {held:.1%} of draws"


@pytest.mark.parametrize("name,n", _cases(TIGHT))
def test_probabilistic_bound_is_within_ten_times_the_99th_percentile(name: str, n: int) -> None:
    err, _, _ = errors(name, n)
    p99 = float(err.quantile(0.99))
    b = bound(FORMATS[name], n)
    assert p99 > 0 and b <= 10 * p99, f"{name} n={n}: bound {b:.3e} vs p99 {p99:.3e} ({b / p99:.1f}x)"


@pytest.mark.parametrize("name", list(TIGHT))
def test_round_to_nearest_error_grows_like_sqrt_n(name: str) -> None:
    lo, hi = TIGHT[name][0], TIGHT[name][-1]
    slope = math.log(float(errors(name, hi)[0].median()) / float(errors(name, lo)[0].median())) / math.log(hi / lo)
    assert 0.4 <= slope <= 0.6, f"{name}: error ~ n^{slope:.2f}"


@pytest.mark.parametrize("name,n", _cases(TRUNCATING))
def test_truncation_stays_below_the_worst_case_bound_and_errs_one_way(name: str, n: int) -> None:
    fmt = FORMATS[name]
    err, s_hat, exact = errors(name, n, truncate=True)
    assert bool((s_hat <= exact).all())  # every rounding is toward zero: the errors share a sign
    assert float(err.max()) <= gamma_worst_case(n, fmt.u)
    assert bound(fmt, n, truncating=True) == min(CAP, gamma_worst_case(n, fmt.u)) >= float(err.max())


@pytest.mark.parametrize("name", list(TRUNCATING))
def test_truncation_error_grows_linearly(name: str) -> None:
    lo, hi = TRUNCATING[name][0], TRUNCATING[name][-1]
    med = [float(errors(name, n, truncate=True)[0].median()) for n in (lo, hi)]
    slope = math.log(med[1] / med[0]) / math.log(hi / lo)
    assert 0.9 <= slope <= 1.1, f"{name}: truncation error ~ n^{slope:.2f}"


@pytest.mark.parametrize("name,n", [("fp16", 1024), ("fp32", 4096)])
def test_truncation_breaks_the_probabilistic_bound(name: str, n: int) -> None:
    # why a truncating (Tensor-Core) accumulator is judged with the worst case: on same-sign data
    # its error, about n*u/3, passes lambda*sqrt(n)*u once n is a few hundred
    err = errors(name, n, truncate=True)[0]
    assert float(err.median()) > gamma_probabilistic(n, FORMATS[name].u)


def test_stagnation_is_outside_the_model_for_same_sign_data() -> None:
    # n*u = 4 but lambda*sqrt(n)*u = 0.24: the running sum reaches 2^11 = 1/u, where FP16's spacing is 2,
    # and every later term below 1 rounds away. The probabilistic model's mean-zero errors do not hold.
    n, fmt = 8192, FORMATS["fp16"]
    assert confidence_lambda(n) * math.sqrt(n) * fmt.u < 0.25
    err, s_hat, exact = errors("fp16", n)
    assert bool((s_hat == 2048).all()) and bool((exact > 3 * 2048 / 2).all())
    assert float((err > bound(fmt, n)).double().mean()) == 1.0


# -- the model's formulas ------------------------------------------------------------------------
def test_lambda_makes_the_union_bound_equal_delta() -> None:
    for n in (1, 16, 4096):
        lam = confidence_lambda(n)
        assert 2 * n * math.exp(-lam * lam / 2) == pytest.approx(DELTA, rel=1e-12)


def test_worst_case_gamma() -> None:
    u = 2.0**-11
    assert gamma_worst_case(1024, u) == 1.0  # n*u = 1/2
    assert gamma_worst_case(2048, u) == math.inf and gamma_worst_case(4096, u) == math.inf
    assert gamma_worst_case(16, u) == 16 * u / (1 - 16 * u)


def test_bound_scales_with_kappa_and_factor_and_is_capped() -> None:
    f16, bf16 = FORMATS["fp16"], FORMATS["bf16"]
    g = gamma_probabilistic(16, f16.u)
    assert bound(f16, 16) == g
    assert bound(f16, 16, kappa=4.0) == 4 * g and bound(f16, 16, kappa=0.25) == g  # kappa below 1 is 1
    assert bound(f16, 16, kappa=4.0, factor=2.0) == 8 * g
    assert bound(bf16, 2**20) == CAP and bound(f16, 2048, truncating=True) == CAP


def test_a_bound_past_the_largest_double_is_inf_and_capped() -> None:
    """FP4 (u = 1/4) over 8192 terms: the exponent is 784, past exp's range (it raised OverflowError, an
    error record for every FP4 strategy on grad_accumulation_buffer[micro=8192] on the GPU)."""
    fp4 = FORMATS["fp4_e2m1"]
    assert fp4.u == 0.25
    assert gamma_probabilistic(8192, fp4.u) == math.inf and bound(fp4, 8192) == CAP
    assert "capped at 1/2" in describe(fp4, 8192)
    assert gamma_probabilistic(16, fp4.u) == pytest.approx(math.expm1(confidence_lambda(16) * 4 * 0.25 + 16 / 16 / 0.75))


def test_describe_spells_the_bound_out() -> None:
    f16, bf16 = FORMATS["fp16"], FORMATS["bf16"]
    assert describe(f16, 4) == f"{confidence_lambda(4):.2f}*sqrt(4)*2^-11 (fp16)"
    assert describe(bf16, 16, kappa=3.0, factor=2.0) == f"3*2*{confidence_lambda(16):.2f}*sqrt(16)*2^-8 (bf16)"
    assert describe(f16, 64, truncating=True) == "n*u/(1-n*u), n=64, u=2^-11 (fp16, truncating)"
    assert describe(bf16, 2**20).endswith("capped at 1/2")


def main() -> None:
    """Print the measured table (docs/tolerance.md quotes it)."""
    print(f"round to nearest, {DRAWS} draws of uniform [0,1) data, error |s_hat - s| / sum|x|")
    print("format  n       n*u     lam*sqrt(n)*u  p99        max        bound      held    bound/p99")
    for name, n in _cases(COVERAGE) + [("fp16", 8192), ("bf16", 512), ("bf16", 1024), ("fp32", 65536)]:
        fmt = FORMATS[name]
        err, _, _ = errors(name, n)
        p99, b = float(err.quantile(0.99)), gamma_probabilistic(n, fmt.u)
        print(f"{name:7s} {n:<7d} {n * fmt.u:<7.3g} {confidence_lambda(n) * math.sqrt(n) * fmt.u:<14.3g} "
              f"{p99:<10.3e} {float(err.max()):<10.3e} {b:<10.3e} {float((err <= b).double().mean()):<7.1%} "
              f"{b / p99:.2f}")
    print("\nround toward zero (truncation)")
    print("format  n       n*u     median     max        n*u/(1-n*u)  median/(n*u)")
    for name, n in _cases(TRUNCATING):
        fmt = FORMATS[name]
        err = errors(name, n, truncate=True)[0]
        print(f"{name:7s} {n:<7d} {n * fmt.u:<7.3g} {float(err.median()):<10.3e} {float(err.max()):<10.3e} "
              f"{gamma_worst_case(n, fmt.u):<12.3e} {float(err.median()) / (n * fmt.u):.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()


def test_bounds_have_the_values_worked_out_by_hand() -> None:
    # lambda = sqrt(2 ln(2n/0.01)); bound = expm1(lambda*sqrt(n)*u + n*u^2/(1-u)), worked out separately
    assert confidence_lambda(4096) == pytest.approx(5.2184449, rel=1e-7)
    assert bound(FORMATS["fp16"], 4096) == pytest.approx(0.1782773, rel=1e-6)
    assert bound(FORMATS["bf16"], 2) == pytest.approx(0.0193383, rel=1e-5)  # softmax_long's n under BF16
    assert bound(FORMATS["bf16"], 4096) == CAP  # 0.97 before the cap
