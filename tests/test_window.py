"""The feasible loss-scale window: exact analytical bounds, checked against FP16's actual rounding."""
from __future__ import annotations

import math

import pytest
import torch

from harness.run.engine import run_case
from harness.values.formats import FORMATS
from harness.run.reference import ReferenceCache
from harness.core.scenario import Case, discover, seed_generator
from harness.core.strategy import PRESETS
from harness.judge.window import budget_count, pow2_above, pow2_inside, scale_window, tensor_window

F16, BF16 = FORMATS["fp16"], FORMATS["bf16"]


def _powers(lo: int, hi: int) -> torch.Tensor:
    """Every power of two 2^lo..2^hi, alternating signs: a gradient tensor with a known range."""
    e = torch.arange(lo, hi + 1, dtype=torch.float64)
    return (torch.exp2(e) * torch.where(torch.arange(e.numel()) % 2 == 0, 1.0, -1.0)).float()


def _lost(g: torch.Tensor, scale: float) -> int:
    """How many non-zero values FP16 flushes to zero at this loss scale (the real cast decides)."""
    return int(((g.double() * scale).to(torch.float16) == 0).sum())


def _overflows(g: torch.Tensor, scale: float) -> bool:
    return not bool(torch.isfinite((g.double() * scale).to(torch.float16)).all())


def test_overflow_threshold_is_max_plus_half_an_ulp() -> None:
    assert F16.overflow_threshold == 65520.0
    assert BF16.overflow_threshold == (2 - 2.0**-8) * 2.0**127
    t = torch.tensor([65519.996, 65520.0], dtype=torch.float64).to(torch.float16)
    assert t[0].item() == 65504.0 and math.isinf(t[1].item())  # the tie at 65520 goes to inf


def test_window_of_2e_minus_40_to_2e_minus_10_has_exact_power_of_two_ends() -> None:
    g = _powers(-40, -10)
    w = tensor_window("g", g, F16, budget=0.0)
    assert (w.lo, w.hi, w.max_abs, w.min_nonzero) == (2.0**15, 65520.0 * 2**10, 2.0**-10, 2.0**-40)
    d = w.as_dict()
    assert (d["lo_pow2"], d["hi_pow2"]) == (2.0**16, 2.0**25)
    # S = lo itself maps 2^-40 to exactly 2^-25, half the smallest subnormal: the tie rounds to zero (even)
    assert _lost(g, 2.0**15) == 1
    assert _lost(g, 2.0**16) == 0 and not _overflows(g, 2.0**16)
    assert not _overflows(g, 2.0**25) and _overflows(g, 2.0**26)  # 2^26 * 2^-10 = 65536 > 65520


def test_lower_end_for_a_value_that_is_not_a_power_of_two() -> None:
    q = 3 * 2.0**-42  # lo = 2^-25 / q = 2^17 / 3 = 43690.67: S = 2^15 is too small, 2^16 enough
    g = torch.tensor([q, 2.0**-12])
    w = tensor_window("g", g, F16, budget=0.0)
    assert w.lo == 2.0**17 / 3 and w.as_dict()["lo_pow2"] == 2.0**16
    assert _lost(g, 2.0**15) == 1 and _lost(g, 2.0**16) == 0  # 3*2^-27 -> 0; 3*2^-26 > 2^-25 -> 2^-24


def test_budget_lets_the_smallest_values_go() -> None:
    # 100 non-zero values: a 1% budget may lose one of them, 2% two; zeros and non-finite entries don't count
    g = torch.tensor([2.0**-44, -2.0**-43, 2.0**-42] + [2.0**-20] * 97 + [0.0, float("inf"), float("nan")])
    assert [tensor_window("g", g, F16, b).lo for b in (0.0, 0.01, 0.02)] == [2.0**19, 2.0**18, 2.0**17]
    w = tensor_window("g", g, F16, 0.01)
    assert (w.as_dict()["lo_pow2"], w.min_nonzero, w.max_abs) == (2.0**19, 2.0**-44, 2.0**-20)
    assert _lost(g[:100], 2.0**19) == 1 and _lost(g[:100], 2.0**18) == 2  # 2^-43 * 2^18 = 2^-25 ties to zero


def test_bf16_window_uses_bf16_range() -> None:
    w = tensor_window("g", _powers(-140, -100), BF16, budget=0.0)
    assert w.lo == 2.0**-134 / 2.0**-140 and w.hi == BF16.overflow_threshold / 2.0**-100


def test_empty_window_names_both_tensors_with_both_numbers() -> None:
    grads = {"a": _powers(-46, -40), "b": _powers(1, 5)}
    w = scale_window(grads, F16, budget=0.0)
    assert w.empty and (w.lo_tensor, w.hi_tensor) == ("a", "b")
    assert (w.lo, w.hi) == (2.0**21, 65520.0 / 32) and w.pow2 == (None, None)
    text = w.describe()
    assert text == ("no single loss scale works: needs S > 2.1e+06 for a (its gradients reach down to 1.4e-14), "
                    "S < 2e+03 for b (max |g| 32)")
    assert w.per_tensor["(all)"].empty  # pooled, the 12 values span 51 binades, FP16 about 40
    d = w.as_dict()
    assert d["empty"] is True
    assert d["per_tensor"]["a"]["lo_pow2"] == 2.0**22 and d["per_tensor"]["b"]["hi_pow2"] == 2.0**10


def test_model_window_is_the_intersection() -> None:
    w = scale_window({"a": _powers(-30, -20), "b": _powers(-12, -8)}, F16, budget=0.0)
    assert (w.lo, w.hi) == (2.0**5, 65520.0 * 2**8) and not w.empty
    assert w.describe() == "fp16 loss scales from 64 to 2^23 work (at most 0% of non-zero gradients flushed)"


def test_zero_gradients_and_no_gradients() -> None:
    w = scale_window({"z": torch.zeros(4)}, F16)
    assert (w.lo, w.hi, w.empty) == (0.0, math.inf, False)
    assert w.describe() == "all gradients are zero: any loss scale works"
    assert scale_window({}, F16).describe() == "no gradients"
    with pytest.raises(ValueError, match="budget"):
        tensor_window("g", torch.ones(2), F16, budget=1.0)


@pytest.mark.parametrize("lo,hi,expected", [
    (2.0**15, 2.0**16, (None, None)),          # open interval: neither end is inside
    (2.0**15, 2.0**16 * (1 + 2**-52), (2.0**16, 2.0**16)),
    (3.0, 5.0, (4.0, 4.0)), (5.0, 7.0, (None, None)), (0.0, 8.0, (None, None)), (1.0, math.inf, (None, None)),
])
def test_pow2_inside_is_exact(lo: float, hi: float, expected: tuple) -> None:
    assert pow2_inside(lo, hi) == expected


def test_every_record_with_gradients_carries_the_window() -> None:
    s = discover().get("scale_window_empty")
    case = Case(s, {}, 0)
    inputs = s.inputs({}, seed_generator(case))
    rec, _ = run_case(case, PRESETS["fp16-dynamic"], torch.device("cpu"), inputs, ReferenceCache())
    win = rec["window"]
    assert win["empty"] is True and win["describe"].startswith("no single loss scale works: needs S > ")
    assert (win["lo_tensor"], win["hi_tensor"]) == ("a", "b")
    ref = scale_window({"a": inputs["g_a"], "b": inputs["g_b"]})
    assert (win["lo"], win["hi"]) == (ref.lo, ref.hi)
    assert rec["outcome"] == "underflow"  # the scaler settles where b fits, so a is flushed


@pytest.mark.parametrize("budget,allowed", [(0.29, 29), (0.07, 7), (0.57, 57), (0.01, 1), (0.5, 50), (0.0, 0)])
def test_a_decimal_budget_allows_exactly_its_share(budget: float, allowed: int) -> None:
    """0.29 * 100 is 28.999999999999996 in binary floating point: floor() of it allowed one value too few.
    The 100 values are 2^-120..2^-21: the lower end is set by the (allowed+1)-th smallest, 2^(allowed-120),
    checked against the real FP16 cast at the two powers of two around it."""
    g = _powers(-120, -21)
    w = tensor_window("g", g, F16, budget)
    assert w.lo == 2.0**-25 / 2.0 ** (allowed - 120)
    lo2 = pow2_above(w.lo)  # the upper end is far below (FP16 spans 40 binades): only the lower end matters
    assert _lost(g, lo2) == allowed < _lost(g, lo2 / 2)  # the window's end is where the budget is met, exactly


def test_budget_count_is_the_exact_floor_of_the_written_decimal() -> None:
    assert [budget_count(b, n) for b, n in ((0.29, 100), (0.57, 100), (0.07, 100), (0.1, 30), (0.3, 10))] == \
        [29, 57, 7, 3, 3]
    assert [math.floor(b * n) for b, n in ((0.29, 100), (0.57, 100), (0.1, 30))] == [28, 56, 3]  # what it was
    with pytest.raises(ValueError, match=r"underflow budget must be in \[0, 1\), got nan"):
        budget_count(math.nan, 4)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_tensor_holding_inf_or_nan_is_not_all_zero(bad: float) -> None:
    w = scale_window({"a": torch.tensor([0.0, bad, 0.0, 0.0])}, F16)
    assert w.nonfinite == {"a": 1} and w.as_dict()["nonfinite"] == 1
    assert w.describe() == "FP32 gradients already inf/NaN in a (1 of 4): no loss scale makes them finite"
    assert w.per_tensor["a"].as_dict()["nonfinite"] == 1


def test_non_finite_gradients_lead_the_model_window_and_the_pooled_one_counts_them() -> None:
    grads = {"a": _powers(-30, -20), "b": torch.tensor([2.0**-12, float("inf"), float("nan"), -2.0**-8])}
    w = scale_window(grads, F16, budget=0.0)
    assert w.nonfinite == {"b": 2} and w.per_tensor["(all)"].nonfinite == 2
    assert (w.lo, w.hi) == (2.0**5, 65520.0 * 2**8)  # the finite values' window, as before
    assert w.describe() == ("FP32 gradients already inf/NaN in b (2 of 4): no loss scale makes them finite; of the "
                            "finite ones, fp16 loss scales from 64 to 2^23 work (at most 0% of non-zero gradients "
                            "flushed)")
