"""The format table against torch.finfo and against values derived by hand; quantize() exactly."""
from __future__ import annotations

import math

import pytest
import torch

from harness.values.formats import FORMATS, get_format, quantize, representable_range_log2

INF, NAN = math.inf, math.nan

# name: (u, max, min normal, min subnormal), written from the bit layouts (DESIGN.md section 8)
HAND = {
    "fp32": (2**-24, (2 - 2**-23) * 2**127, 2**-126, 2**-149),
    "tf32": (2**-11, (2 - 2**-10) * 2**127, 2**-126, 2**-136),
    "fp16": (2**-11, 65504.0, 2**-14, 2**-24),
    "bf16": (2**-8, (2 - 2**-7) * 2**127, 2**-126, 2**-133),
    "fp8_e4m3": (2**-4, 448.0, 2**-6, 2**-9),
    "fp8_e5m2": (2**-3, 57344.0, 2**-14, 2**-16),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@pytest.mark.parametrize("name", list(HAND))
def test_table_matches_hand_derived_values(name: str) -> None:
    f = FORMATS[name]
    u, mx, mn, sub = HAND[name]
    assert (f.u, f.max, f.min_normal, f.min_subnormal) == (u, mx, mn, sub)
    assert f.eps == 2 * u and f.smallest == (sub if sub is not None else mn)


@pytest.mark.parametrize("name", list(DTYPES))
def test_table_matches_torch_finfo(name: str) -> None:
    f, fi = FORMATS[name], torch.finfo(DTYPES[name])
    assert f.dtype == DTYPES[name]
    assert f.eps == fi.eps and f.u == fi.eps / 2
    assert f.max == fi.max and f.min_normal == fi.smallest_normal
    assert f.precision == torch.finfo(DTYPES[name]).bits - f.exponent_bits  # sign bit replaced by the hidden bit


@pytest.mark.parametrize("name", list(DTYPES))
def test_min_subnormal_is_the_smallest_positive_value_of_the_dtype(name: str) -> None:
    f, dt = FORMATS[name], DTYPES[name]
    s = f.min_subnormal
    up = torch.tensor([s, s / 2, s * 0.75], dtype=torch.float64).to(dt).double().tolist()
    # s survives; s/2 is the tie between 0 and s and rounds to even (0); 0.75*s rounds up to s
    assert up == [s, 0.0, s]


@pytest.mark.parametrize("name,k", [("fp16", k) for k in range(-24, 16)] + [("bf16", k) for k in (-133, -126, 0, 127)]
                         + [("fp8_e4m3", k) for k in range(-9, 9)] + [("fp8_e5m2", k) for k in range(-16, 16)]
                         + [("tf32", k) for k in (-126, -1, 0, 100, 127)])
def test_powers_of_two_in_range_are_exact(name: str, k: int) -> None:
    x = torch.tensor([2.0**k, -(2.0**k)])
    assert quantize(x, name).tolist() == [2.0**k, -(2.0**k)]


@pytest.mark.parametrize("name,below", [("fp16", 2**-26), ("bf16", 2**-135), ("fp8_e4m3", 2**-11),
                                        ("fp8_e5m2", 2**-18)])
def test_below_half_the_smallest_subnormal_flushes_to_zero(name: str, below: float) -> None:
    assert quantize(torch.tensor([below, -below]), name).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name,p", [("fp16", 11), ("bf16", 8), ("tf32", 11), ("fp8_e4m3", 4), ("fp8_e5m2", 3)])
def test_ties_round_to_nearest_even(name: str, p: int) -> None:
    ulp1 = 2.0 ** (1 - p)  # spacing just above 1
    x = torch.tensor([1 + ulp1 / 2,            # tie between 1 (even) and 1+ulp: down
                      1 + 3 * ulp1 / 2,        # tie between 1+ulp (odd) and 1+2ulp (even): up
                      1 + ulp1 / 2 + ulp1 / 8,  # past the tie: up
                      -(1 + ulp1 / 2),         # the sign does not matter
                      2 - ulp1 / 4])           # tie between 2-ulp/2 (odd) and 2 (even): up into the next binade
    assert quantize(x, name).tolist() == [1.0, 1 + 2 * ulp1, 1 + ulp1, -1.0, 2.0]


def test_subnormal_ties_round_to_even() -> None:
    s = 2.0**-24  # fp16: 1.5 s is the tie between 1 s (odd) and 2 s (even); 2.5 s between 2 s (even) and 3 s
    assert quantize(torch.tensor([1.5 * s, 2.5 * s, 2.75 * s, 1023.5 * s]), "fp16").tolist() == \
        [2 * s, 2 * s, 3 * s, 1024 * s]  # 1024 s = 2^-14, the smallest normal


def test_overflow_to_inf_follows_round_to_nearest() -> None:
    # fp16: max 65504, ulp 32 there; 65520 is the tie with 2^16 (even) and overflows
    x = torch.tensor([65504.0, 65519.0, 65520.0, -65520.0, 1e6, INF, NAN])
    out = quantize(x, "fp16").tolist()
    assert out[:6] == [65504.0, 65504.0, INF, -INF, INF, INF] and math.isnan(out[6])
    # e5m2: max 57344, ulp 8192; 61440 is the tie with 2^16 (even)
    assert quantize(torch.tensor([61439.0, 61440.0]), "fp8_e5m2").tolist() == [57344.0, INF]
    # bf16: max (2-2^-7)*2^127; the tie with 2^128 overflows
    bmax = FORMATS["bf16"].max
    assert quantize(torch.tensor([bmax, bmax + 2.0**119]), "bf16").tolist() == [bmax, INF]


def test_e4m3_has_no_inf_overflow_is_nan() -> None:
    # 464 = 448 + ulp/2 is the tie and keeps 448 (even); anything above rounds past max
    out = quantize(torch.tensor([448.0, 464.0, 464.5, 470.0, -500.0, INF]), "fp8_e4m3").tolist()
    assert out[:2] == [448.0, 448.0] and all(math.isnan(v) for v in out[2:])


def test_tf32_rounds_fp32_bits_and_keeps_specials() -> None:
    fmax = torch.finfo(torch.float32).max
    tmax = FORMATS["tf32"].max
    out = quantize(torch.tensor([fmax, tmax, -fmax, INF, -INF, NAN, 2.0**-140]), "tf32").tolist()
    assert out[:5] == [INF, tmax, -INF, INF, -INF]  # FP32's max rounds up past TF32's max
    assert math.isnan(out[5])
    assert out[6] == 0.0  # FP32 subnormal below half of 2^-136, the 10-bit grid there: flushed


def test_fp32_and_fp64_are_identities_on_float32() -> None:
    x = torch.tensor([1 + 2.0**-23, 3.0e38, 2.0**-149])
    assert torch.equal(quantize(x, "fp32"), x) and torch.equal(quantize(x, FORMATS["fp64"]), x)


def test_unknown_format_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown format 'fp12'.*fp16.*bf16"):
        get_format("fp12")
    with pytest.raises(ValueError, match="fp12"):
        quantize(torch.ones(1), "fp12")


def test_derived_quantities() -> None:
    f16 = FORMATS["fp16"]
    assert (f16.precision, f16.bias, f16.emax, f16.emin) == (11, 15, 15, -14)
    e4 = FORMATS["fp8_e4m3"]
    assert (e4.bias, e4.emax, e4.emin) == (7, 8, -6)  # finite-only: the top exponent holds normal numbers
    assert representable_range_log2("fp16") == (-24.0, math.log2(65504))
    assert f16.dynamic_range_log2 == math.log2(65504) + 24
    assert FORMATS["fp16"].as_dict() == {"name": "fp16", "precision": 11, "u": 2**-11, "max": 65504.0,
                                         "min_normal": 2**-14, "min_subnormal": 2**-24}
