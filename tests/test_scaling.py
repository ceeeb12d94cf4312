"""Loss scalers: exact dynamic sequences, the spec grammar's round trip, and malformed specs."""
from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.scaling import (SCALER_PRESETS, LossScaleFloorError, Scaler, ScalerSpec, ScaleTrace, format_number,
                             parse_number, parse_scaler)

T, F = True, False


def _steps(spec: str, found: list[bool]) -> tuple[list[float], list[float], list[str], list[bool]]:
    s = Scaler(parse_scaler(spec))
    ds = [s.update(f) for f in found]
    return [d.scale for d in ds], [d.next_scale for d in ds], [d.event for d in ds], [d.skipped for d in ds]


def test_growth_every_interval_clamped_at_max() -> None:
    used, nxt, ev, skip = _steps("dynamic(init=4,growth=2,interval=2,min=1,max=16)", [F] * 6)
    assert used == [4, 4, 8, 8, 16, 16]
    assert nxt == [4, 8, 8, 16, 16, 16]
    assert ev == ["hold", "grow", "hold", "grow", "hold", "hold"]  # at the cap a due growth holds
    assert skip == [F] * 6


def test_an_overflow_restarts_the_growth_count() -> None:
    used, _, ev, skip = _steps("dynamic(init=4,interval=2)", [F, T, F, F, F])
    assert used == [4, 4, 2, 2, 4] and ev == ["hold", "backoff", "hold", "grow", "hold"]
    assert skip == [F, T, F, F, F]


def test_backoff_clamped_at_min_then_stalls_at_the_floor() -> None:
    used, nxt, ev, skip = _steps("dynamic(init=4,backoff=0.25,interval=100,min=0.5)", [T] * 4)
    assert used == [4, 1, 0.5, 0.5] and nxt == [1, 0.5, 0.5, 0.5]
    assert ev == ["backoff", "backoff", "floor", "floor"] and skip == [T] * 4


def test_raise_at_the_floor_names_the_floor() -> None:
    s = Scaler(parse_scaler("dynamic(init=4,backoff=0.25,interval=100,min=0.5,floor=raise)"))
    assert [s.update(True).next_scale for _ in range(2)] == [1, 0.5]
    with pytest.raises(LossScaleFloorError, match="minimum loss scale 0.5"):
        s.update(True)


def test_hysteresis_delays_the_first_backoff_only_until_the_next_growth() -> None:
    # DeepSpeed (delayed_shift) and Megatron-LM (hysteresis): the counter is reset only by a growth,
    # so once used up every overflow backs off; a good step in between does not reset it.
    found = [T, F, T, T, T, F, F, F, T, T]
    used, nxt, ev, skip = _steps("dynamic(init=64,interval=3,min=1,hysteresis=2)", found)
    assert used == [64, 64, 64, 32, 16, 8, 8, 8, 16, 16]
    assert nxt == [64, 64, 32, 16, 8, 8, 8, 16, 16, 8]
    assert ev == ["hold", "hold", "backoff", "backoff", "backoff", "hold", "hold", "grow", "hold", "backoff"]
    assert skip == found


def test_deepspeed_preset_raises_after_its_hysteresis_at_the_floor() -> None:
    spec = replace(SCALER_PRESETS["deepspeed"], init=2.0)  # floor 1, hysteresis 2, floor=raise
    s = Scaler(spec)
    assert [s.update(True).event for _ in range(2)] == ["hold", "backoff"]
    assert s.scale == 1
    with pytest.raises(LossScaleFloorError):
        s.update(True)


def test_megatron_preset_keeps_skipping_at_the_floor() -> None:
    s = Scaler(replace(SCALER_PRESETS["megatron"], init=2.0))
    assert [s.update(True).event for _ in range(4)] == ["hold", "backoff", "floor", "floor"]
    assert s.scale == 1


@pytest.mark.parametrize("spec,scale,skips", [
    ("none", 1.0, [F, F, F]),  # no scaler, no overflow check: the step is applied as plain training does
    ("static(8)", 8.0, [F, T, F]),  # a static scaler still skips an overflowing step
])
def test_static_skips_on_overflow_none_does_not_and_neither_moves(spec: str, scale: float, skips: list) -> None:
    used, nxt, ev, skip = _steps(spec, [F, T, F])
    assert used == nxt == [scale] * 3 and ev == ["hold"] * 3 and skip == skips


def test_gradscaler_specs_are_not_run_by_our_scaler() -> None:
    with pytest.raises(ValueError, match="torch.amp.GradScaler"):
        Scaler(parse_scaler("gradscaler(init=2^16,growth=2,backoff=0.5,interval=2000)"))


def test_trace_summary_counts_every_decision() -> None:
    s = Scaler(parse_scaler("dynamic(init=8,interval=2,min=2)"))
    tr = ScaleTrace("x")
    for f in [T, T, T, F, F]:
        tr.add(s.update(f))
    assert tr.scales == [8, 4, 2, 2, 2]
    sm = tr.summary()
    assert (sm["steps"], sm["skipped"], sm["skip_rate"], sm["scale_min"], sm["scale_max"], sm["scale_final"],
            sm["floor_steps"], sm["scale_nonfinite"]) == (5, 3, 0.6, 2, 8, 2, 1, 0)
    thin = tr.as_dict(max_points=2)
    assert thin["trajectory"] == [8, 2] and thin["trajectory_stride"] == 3  # steps 0 and 3


SPECS = [ScalerSpec("none"), ScalerSpec("static", init=1024), ScalerSpec("static", init=0.5),
         ScalerSpec("static", init=2.0**-20), ScalerSpec("static", init=3.75),
         ScalerSpec("dynamic", init=2.0**10, growth=1.5, backoff=0.125, interval=7, min=2.0**-10, max=2.0**24,
                    hysteresis=3, floor="raise"),
         ScalerSpec("gradscaler", init=2.0**10, growth=4, backoff=0.25, interval=7),
         *SCALER_PRESETS.values()]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_every_spec_round_trips_and_prints_stably(spec: ScalerSpec) -> None:
    text = str(spec)
    assert parse_scaler(text) == spec
    assert str(parse_scaler(text)) == text


@pytest.mark.parametrize("name", list(SCALER_PRESETS))
def test_preset_names_parse_to_the_presets(name: str) -> None:
    assert parse_scaler(name) is SCALER_PRESETS[name]


def test_presets_print_their_policies() -> None:
    assert str(SCALER_PRESETS["torch"]) == \
        "dynamic(init=2^16,growth=2,backoff=0.5,interval=2000,min=0,max=inf,hysteresis=1,floor=stall)"
    assert str(SCALER_PRESETS["apex"]).count("max=2^24") == 1
    assert "min=1,max=inf,hysteresis=2,floor=raise" in str(SCALER_PRESETS["deepspeed"])
    assert str(SCALER_PRESETS["megatron"]).startswith("dynamic(init=2^32,")


def test_a_preset_as_base_with_overrides() -> None:
    assert parse_scaler("dynamic(apex,interval=10)") == replace(SCALER_PRESETS["apex"], interval=10)


@given(st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False))
def test_static_scale_round_trips_any_float(x: float) -> None:
    spec = ScalerSpec("static", init=x)
    assert parse_scaler(str(spec)) == spec


def test_format_and_parse_numbers() -> None:
    assert [format_number(x) for x in (2.0**16, 2.0**-10, 128.0, 0.5, math.inf, -math.inf, math.nan, 3.25)] == \
        ["2^16", "2^-10", "128", "0.5", "inf", "-inf", "nan", "3.25"]
    assert [parse_number(t, "x") for t in ("2^16", "2^-10", "65536", "inf", "0.5")] == \
        [65536.0, 2.0**-10, 65536.0, math.inf, 0.5]


BAD = [
    ("static(-1)", "got -1"), ("static(0)", "got 0"), ("static(nan)", "got nan"), ("static(inf)", "got inf"),
    ("static(abc)", "'abc' is not a number"), ("static(2^100000)", "'2^100000' is too large"),
    ("static(-2^0.5)", "'-2^0.5' is not a number"),
    ("dynamic(foo=1)", "unknown scaler key 'foo'"), ("dynamic(interval=2.5)", "'2.5'"),
    ("dynamic(interval=0)", "interval must be a whole number >= 1, got 0"),
    ("dynamic(hysteresis=0)", "hysteresis must be a whole number >= 1, got 0"),
    ("dynamic(growth=1)", "growth must be > 1, got 1"), ("dynamic(backoff=1.5)", "got 1.5"),
    ("dynamic(init=4,min=8)", "min=8 init=4"), ("dynamic(init=4,max=2)", "init=4 max=2"),
    ("dynamic(floor=explode)", "'explode'"), ("banana(1)", "unknown scaler kind 'banana'"),
    ("dynamic(init=4", "malformed scaler 'dynamic(init=4'"), ("static", "malformed scaler 'static'"),
    ("gradscaler(min=1)", "unknown scaler key 'min' for gradscaler"), ("dynamic(1)", "argument '1' must be key=value"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[b[0] for b in BAD])
def test_malformed_specs_name_the_bad_value(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_scaler(text)


def test_format_number_calls_only_exact_powers_of_two_powers() -> None:
    near = 2.0**60 * (1 + 2.0**-52)  # log2 rounds to 60.0, but it is not 2^60
    assert format_number(near) != "2^60" and parse_number(format_number(near), "x") == near
    assert format_number(2.0**60) == "2^60" and format_number(2.0**-30) == "2^-30"
