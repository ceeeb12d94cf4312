"""Property-based tests (hypothesis) of the format table, the metrics and the loss scalers: facts that
must hold for every input, not only the hand-picked ones of the unit tests."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.values.formats import FORMATS, quantize
from harness.judge.metrics import tensor_metrics
from harness.core.scaling import ScalerSpec, Scaler

FAST = settings(max_examples=200, deadline=None)
ROUNDED = ("fp16", "bf16", "tf32")


def f32(**kw) -> st.SearchStrategy[float]:
    return st.floats(width=32, allow_nan=False, allow_infinity=False, **kw)


def normal_range(name: str) -> st.SearchStrategy[float]:
    """FP32 values whose magnitude lies in ``name``'s normal range, either sign."""
    fmt = FORMATS[name]
    mag = f32(min_value=fmt.min_normal, max_value=fmt.max)
    return st.tuples(mag, st.booleans()).map(lambda t: -t[0] if t[1] else t[0])


def q(x: float, name: str) -> float:
    return float(quantize(torch.tensor([x], dtype=torch.float32), FORMATS[name])[0])


# -- the format table -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ROUNDED)
@FAST
@given(data=st.data())
def test_quantize_is_idempotent(name: str, data: st.DataObject) -> None:
    x = data.draw(f32())
    once = q(x, name)
    assert q(once, name) == once or (math.isnan(once) and math.isnan(q(once, name)))


@pytest.mark.parametrize("name", ROUNDED)
@FAST
@given(data=st.data())
def test_quantize_is_monotone(name: str, data: st.DataObject) -> None:
    hi = FORMATS[name].max
    a, b = sorted(data.draw(st.lists(f32(min_value=-hi, max_value=hi), min_size=2, max_size=2)))
    assert q(a, name) <= q(b, name)


@pytest.mark.parametrize("name", ROUNDED)
@FAST
@given(data=st.data())
def test_quantize_error_is_at_most_u_relative_in_the_normal_range(name: str, data: st.DataObject) -> None:
    fmt = FORMATS[name]
    x = data.draw(normal_range(name))
    err = abs(q(x, name) - x)  # exact in float64: both are FP32 values
    assert err <= fmt.u * abs(x), (x, q(x, name), fmt.u)


@pytest.mark.parametrize("name", ROUNDED)
def test_the_bound_is_tight_at_a_midpoint(name: str) -> None:
    """Halfway between 1 and the next number the error is exactly u (ties to even go down to 1)."""
    fmt = FORMATS[name]
    mid = 1.0 + fmt.u
    assert q(mid, name) == 1.0 and abs(q(mid, name) - mid) == fmt.u * 1.0


# -- metrics ----------------------------------------------------------------------------------------
vectors = st.lists(f32(min_value=-1e6, max_value=1e6), min_size=1, max_size=64)


@FAST
@given(xs=vectors)
def test_rel_err_of_a_tensor_against_itself_is_zero(xs: list[float]) -> None:
    x = torch.tensor(xs)
    m = tensor_metrics(x, x.clone(), FORMATS["fp16"])
    assert m["rel_err"] == 0 and m["max_abs_err"] == 0 and m["nonfinite"] == 0 and m["underflow_frac"] == 0


@FAST
@given(xs=vectors, noise=st.lists(f32(min_value=-2.0**-7, max_value=2.0**-7), min_size=64, max_size=64),
       k=st.integers(min_value=-20, max_value=20))
def test_rel_err_is_unchanged_by_scaling_both_by_a_power_of_two(xs: list[float], noise: list[float], k: int) -> None:
    ref = torch.tensor(xs, dtype=torch.float64)
    cand = ref * (1 + torch.tensor(noise[: len(xs)], dtype=torch.float64))
    a = tensor_metrics(cand, ref, FORMATS["bf16"])["rel_err"]
    b = tensor_metrics(cand * 2.0**k, ref * 2.0**k, FORMATS["bf16"])["rel_err"]
    assert a == b or (math.isnan(a) and math.isnan(b))


@FAST
@given(ref=vectors, cand=vectors)
def test_underflow_and_overflow_fractions_are_fractions(ref: list[float], cand: list[float]) -> None:
    n = min(len(ref), len(cand))
    r, c = torch.tensor(ref[:n]), torch.tensor(cand[:n])
    c[::3] = 0.0  # some flushed entries
    m = tensor_metrics(c, r, FORMATS["fp16"])
    assert 0.0 <= m["underflow_frac"] <= 1.0 and 0.0 <= m["overflow_frac"] <= 1.0
    nonzero = int((r != 0).sum())
    assert m["underflow_frac"] * nonzero == pytest.approx(int(((r != 0) & (c == 0)).sum()))


# -- scalers ----------------------------------------------------------------------------------------
pow2 = st.integers(min_value=-8, max_value=40).map(lambda e: 2.0**e)


@st.composite
def dynamic_specs(draw) -> ScalerSpec:
    lo, hi = sorted(draw(st.lists(st.integers(min_value=-8, max_value=40), min_size=2, max_size=2)))
    init = 2.0 ** draw(st.integers(min_value=lo, max_value=hi))
    return ScalerSpec("dynamic", init=init, growth=2.0 ** draw(st.integers(1, 3)),
                      backoff=2.0 ** -draw(st.integers(1, 3)), interval=draw(st.integers(1, 6)),
                      min=2.0**lo, max=2.0**hi, hysteresis=draw(st.integers(1, 3)), floor="stall")


steps = st.lists(st.booleans(), min_size=1, max_size=200)  # found_inf per step


@FAST
@given(spec=dynamic_specs(), infs=steps)
def test_a_dynamic_scale_stays_within_min_and_max(spec: ScalerSpec, infs: list[bool]) -> None:
    s = Scaler(spec)
    for found in infs:
        d = s.update(found)
        assert spec.min <= d.scale <= spec.max and spec.min <= d.next_scale <= spec.max


@FAST
@given(spec=dynamic_specs(), infs=steps)
def test_skipped_steps_are_exactly_the_overflow_steps(spec: ScalerSpec, infs: list[bool]) -> None:
    s = Scaler(spec)
    decisions = [s.update(found) for found in infs]
    assert [d.skipped for d in decisions] == infs
    assert sum(d.skipped for d in decisions) == sum(infs)


@FAST
@given(spec=dynamic_specs(), infs=steps)
def test_growth_happens_exactly_every_interval_clean_steps(spec: ScalerSpec, infs: list[bool]) -> None:
    """A step grows the scale iff it completes ``interval`` clean steps since the last growth or overflow
    (and the scale is below its cap)."""
    spec = ScalerSpec("dynamic", init=spec.init, growth=spec.growth, backoff=spec.backoff, interval=spec.interval,
                      min=spec.min, max=math.inf, hysteresis=spec.hysteresis, floor="stall")  # no cap: every one grows
    s = Scaler(spec)
    clean = 0
    for found in infs:
        d = s.update(found)
        clean = 0 if found else clean + 1
        grows = clean == spec.interval
        assert (d.event == "grow") == grows
        if grows:
            assert d.next_scale == d.scale * spec.growth
            clean = 0
