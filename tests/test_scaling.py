"""Loss scalers: exact dynamic sequences, the spec grammar's round trip, and malformed specs."""
from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness.core.scaling import (SCALER_EMULATES, SCALER_PRESETS, LossScaleFloorError, Scaler, ScalerSpec, ScaleTrace,
                             format_number, parse_number, parse_scaler)

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
         ScalerSpec("dynamic", init=3.0, interval=2**31 - 1, hysteresis=2**31 - 1, store="fp64", to_inf="allow",
                    first_growth="interval+1"),
         ScalerSpec("static", init=2.0**-149), ScalerSpec("dynamic", init=2.0**127, max=2.0**127),
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
        ("dynamic(init=2^16,growth=2,backoff=0.5,interval=2000,min=0,max=inf,hysteresis=1,floor=stall,store=fp32,"
         "to_inf=refuse,first_growth=interval)")
    assert str(SCALER_PRESETS["apex"]).endswith("max=2^24,hysteresis=1,floor=stall,store=fp64,to_inf=allow,"
                                                "first_growth=interval)")
    assert str(SCALER_PRESETS["deepspeed"]).endswith(
        "min=1,max=inf,hysteresis=2,floor=raise,store=fp64,to_inf=allow,first_growth=interval+1)")
    assert str(SCALER_PRESETS["deepspeed-0.17.0"]) == str(SCALER_PRESETS["deepspeed"]).replace("interval+1", "interval")
    assert str(SCALER_PRESETS["megatron"]).startswith("dynamic(init=2^32,")
    assert "store=fp32,to_inf=allow" in str(SCALER_PRESETS["megatron"])
    assert set(SCALER_EMULATES) == set(SCALER_PRESETS)
    assert "0.17.1" in SCALER_EMULATES["deepspeed"] and "0.17.0" in SCALER_EMULATES["deepspeed-0.17.0"]


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
    ("dynamic(interval=0)", "interval must be a whole number from 1 to 2^31-1, got 0"),
    ("dynamic(hysteresis=0)", "hysteresis must be a whole number from 1 to 2^31-1, got 0"),
    ("dynamic(growth=1)", "growth must be a number > 1 and at most 3.4e38, got 1"), ("dynamic(backoff=1.5)", "got 1.5"),
    ("dynamic(init=4,min=8)", "min=8 init=4"), ("dynamic(init=4,max=2)", "init=4 max=2"),
    ("dynamic(floor=explode)", "'explode'"), ("banana(1)", "unknown scaler kind 'banana'"),
    ("dynamic(init=4", "malformed scaler 'dynamic(init=4'"), ("static", "malformed scaler 'static'"),
    ("gradscaler(min=1)", "unknown scaler key 'min' for gradscaler"), ("dynamic(1)", "argument '1' must be key=value"),
    ("gradscaler(store=fp64)", "unknown scaler key 'store' for gradscaler"),
    # numbers past a field's range: one ValueError naming the range, never OverflowError or a conversion message
    ("dynamic(interval=inf)", "scaler interval must be a whole number from 1 to 2^31-1, got 'inf'"),
    ("dynamic(interval=-inf)", "scaler interval must be a whole number from 1 to 2^31-1, got '-inf'"),
    ("dynamic(interval=nan)", "scaler interval must be a whole number from 1 to 2^31-1, got 'nan'"),
    ("dynamic(interval=1e400)", "scaler interval: '1e400' is too large for a float (use inf for no limit)"),
    ("dynamic(interval=2^31)", "scaler interval must be a whole number from 1 to 2^31-1, got 2147483648"),
    ("dynamic(hysteresis=inf)", "scaler hysteresis must be a whole number from 1 to 2^31-1, got 'inf'"),
    ("dynamic(hysteresis=-1)", "scaler hysteresis must be a whole number from 1 to 2^31-1, got -1"),
    ("dynamic(init=1e400)", "scaler init: '1e400' is too large for a float"),
    ("static(1e400)", "static scale: '1e400' is too large for a float"),
    ("gradscaler(init=2^200)", "scaler init must be a number from 2^-149 to 3.4e38 (FP32's range: the scale "
                               "multiplies an FP32 loss), got 2^200"),
    ("dynamic(init=2^200,max=inf)", "scaler init must be a number from 2^-149 to 3.4e38"),
    ("static(2^-150)", "loss scale must be a number from 2^-149 to 3.4e38"), ("static(2^128)", "got 2^128"),
    ("dynamic(max=2^200)", "scaler max (or inf for no cap) must be a number from 2^-149 to 3.4e38"),
    ("dynamic(growth=inf)", "scaler growth must be a number > 1 and at most 3.4e38, got inf"),
    ("dynamic(growth=1e39)", "growth must be a number > 1 and at most 3.4e38"),
    ("dynamic(growth=nan)", "got nan"), ("dynamic(backoff=nan)", "backoff must be a number in (0, 1), got nan"),
    ("dynamic(min=nan)", "min=nan"), ("dynamic(min=inf)", "min=inf"), ("dynamic(max=nan)", "max=nan"),
    ("dynamic(min=-1)", "min=-1"),
    ("dynamic(store=fp16)", "scaler store must be one of fp32, fp64, got 'fp16'"),
    ("dynamic(to_inf=maybe)", "scaler to_inf must be one of refuse, allow"),
    ("dynamic(first_growth=interval+2)", "first_growth must be one of interval, interval+1"),
    # a key given twice was silently the last one
    ("dynamic(init=2^10,init=2^20)", "scaler key 'init' given twice in 'dynamic(init=2^10,init=2^20)'"),
    ("gradscaler(interval=8,interval=9)", "scaler key 'interval' given twice"),
    ("dynamic(apex,deepspeed)", "starts from two presets (apex, deepspeed); name one"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[b[0] for b in BAD])
def test_malformed_specs_name_the_bad_value(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_scaler(text)


def test_format_number_calls_only_exact_powers_of_two_powers() -> None:
    near = 2.0**60 * (1 + 2.0**-52)  # log2 rounds to 60.0, but it is not 2^60
    assert format_number(near) != "2^60" and parse_number(format_number(near), "x") == near
    assert format_number(2.0**60) == "2^60" and format_number(2.0**-30) == "2^-30"


@pytest.mark.parametrize("kind,field,value", [("gradscaler", "store", "fp64"), ("gradscaler", "min", 1.0),
                                              ("static", "interval", 7), ("none", "hysteresis", 2)])
def test_a_field_its_kind_does_not_print_is_refused_not_lost(kind: str, field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"scaler {field} applies to dynamic scalers, not to {kind}"):
        ScalerSpec(kind, **{field: value})


@pytest.mark.parametrize("field,value", [("interval", 2.5), ("interval", True), ("hysteresis", 2.0),
                                         ("interval", 0), ("init", math.nan), ("init", 2.0**130), ("init", 10**400),
                                         ("growth", "2"), ("max", True)])
def test_a_spec_built_in_code_is_checked_as_a_parsed_one(field: str, value: object) -> None:
    with pytest.raises(ValueError, match="scaler (interval|hysteresis|init|growth|max) must be"):
        ScalerSpec("dynamic", **{field: value})


# ---- the extremes, against the real implementations -------------------------------------------------------

def _torch_steps(init: float, growth: float, backoff: float, interval: int, found: list[bool],
                 device: str = "cpu") -> list[float]:
    """The scale after each step, from the real ``torch._amp_update_scale_`` (what GradScaler.update runs)."""
    scale = torch.full((), init, dtype=torch.float32, device=device)
    tracker = torch.zeros((), dtype=torch.int32, device=device)
    out = []
    for f in found:
        torch._amp_update_scale_(scale, tracker, torch.tensor(float(f), device=device), growth, backoff, interval)
        out.append(scale.item())
    return out


def _ours(spec: ScalerSpec, found: list[bool]) -> list[float]:
    s = Scaler(spec)
    return [s.update(f).next_scale for f in found]


def test_torch_preset_never_grows_to_inf_as_amp_update_scale_refuses() -> None:
    found = [F, F, T, T]
    real = _torch_steps(2.0**126, 2.0, 0.5, 1, found)
    assert real == [2.0**127, 2.0**127, 2.0**126, 2.0**125]
    assert _ours(parse_scaler("dynamic(init=2^126,interval=1)"), found) == real
    assert _ours(replace(SCALER_PRESETS["torch"], init=2.0**126, interval=1), found) == real
    # the refused growth restarts the count, as torch's tracker does: the next growth is `interval` steps later
    s = Scaler(parse_scaler("dynamic(init=2^126,interval=2)"))
    assert [d.event for d in (s.update(F) for _ in range(6))] == ["hold", "grow", "hold", "hold", "hold", "hold"]


@pytest.mark.parametrize("init,growth,backoff,interval", [
    (2.0**126, 2.0, 0.5, 1), (2.0**120, 3.0, 0.3, 2), (2.0**-145, 2.0, 0.5, 1), (2.0**-140, 1.5, 0.1, 3),
    (3.0e38, 1.0001, 0.999, 1), (1.0, 7.0, 0.125, 1),
])
@given(found=st.lists(st.booleans(), min_size=1, max_size=80))
def test_torch_preset_is_amp_update_scale_step_by_step(init: float, growth: float, backoff: float, interval: int,
                                                        found: list[bool]) -> None:
    """Side by side with the real op at the extremes of FP32: growth into 2^128, backoff through the
    subnormals to 0, factors that are not powers of two (one rounding to FP32, from the double product)."""
    spec = ScalerSpec("dynamic", init=init, growth=growth, backoff=backoff, interval=interval)
    assert _ours(spec, found) == _torch_steps(init, growth, backoff, interval, found)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("init,growth,backoff,interval", [(2.0**126, 2.0, 0.5, 1), (2.0**-140, 1.5, 0.1, 3),
                                                          (3.0e38, 1.0001, 0.999, 1)])
def test_torch_preset_is_the_cuda_amp_update_scale_too(init: float, growth: float, backoff: float,
                                                       interval: int) -> None:
    """GradScaler on a GPU runs the CUDA kernel of ``_amp_update_scale_``: the same scales, step by step."""
    found = [F, F, T, T] + [F, T, F, F, F, T, T, F, F, F, F] * 4 + [T] * 40 + [F] * 12
    spec = ScalerSpec("dynamic", init=init, growth=growth, backoff=backoff, interval=interval)
    assert _ours(spec, found) == _torch_steps(init, growth, backoff, interval, found, "cuda")


def test_torch_preset_collapses_to_zero_in_fp32_as_gradscaler_does() -> None:
    found = [T] * 170 + [F] * 4
    real = _torch_steps(2.0**16, 2.0, 0.5, 2, found)
    assert real[164] == 2.0**-149 and real[165:] == [0.0] * 9  # 2^-150 ties to 0; 0 * 2 stays 0
    assert _ours(replace(SCALER_PRESETS["torch"], interval=2), found) == real


class _Apex:
    """apex/amp/scaler.py LossScaler.update_scale, transcribed: a Python float, halved on overflow (no floor
    by default), doubled after ``scale_window`` unskipped steps up to the cap 2^24."""

    def __init__(self, window: int) -> None:
        self.scale, self.window, self.unskipped = 2.0**16, window, 0

    def update(self, overflow: bool) -> float:
        if overflow:
            self.scale, self.unskipped = self.scale / 2.0, 0
        else:
            self.unskipped += 1
        if self.unskipped == self.window:
            self.scale, self.unskipped = min(2.0**24, self.scale * 2.0), 0
        return self.scale


def test_apex_holds_a_python_float_and_recovers_where_fp32_is_stuck_at_zero() -> None:
    found = [T] * 170 + [F] * 6
    spec = replace(SCALER_PRESETS["apex"], interval=2)
    ours = _ours(spec, found)
    assert ours[169] == 2.0**-154 and ours[-1] == 2.0**-151  # 170 halvings, then 3 growths: not stuck at 0
    ref = _Apex(2)
    assert ours == [ref.update(f) for f in found]
    assert _ours(replace(spec, store="fp32"), found)[-1] == 0.0  # what an FP32 store did: 0, for ever


@given(found=st.lists(st.booleans(), min_size=1, max_size=120))
def test_apex_preset_is_apex_step_by_step(found: list[bool]) -> None:
    ref = _Apex(3)
    assert _ours(replace(SCALER_PRESETS["apex"], interval=3), found) == [ref.update(f) for f in found]


class _DeepSpeed:
    """deepspeed/runtime/fp16/loss_scaler.py DynamicLossScaler.update_scale, transcribed from 0.17.0 and
    0.17.1 (``new``): the growth test is the only difference."""

    def __init__(self, init: float, window: int, min_scale: float, delayed_shift: int, new: bool) -> None:
        self.cur_scale, self.cur_iter, self.last_overflow_iter = init, 0, -1
        self.window, self.min_scale, self.delayed_shift, self.cur_hysteresis = window, min_scale, delayed_shift, \
            delayed_shift
        self.new = new

    def update(self, overflow: bool) -> float:
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale:
                    raise LossScaleFloorError("at minimum")
                self.cur_scale = max(self.cur_scale / 2.0, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.new:
                stable = self.cur_iter - self.last_overflow_iter - 1
                due = stable > 0 and stable % self.window == 0
            else:
                due = (self.cur_iter - self.last_overflow_iter) % self.window == 0
            if due:
                self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= 2.0
        self.cur_iter += 1
        return self.cur_scale


def _until_raise(step, found: list[bool]) -> list[object]:
    out: list[object] = []
    for f in found:
        try:
            out.append(step(f))
        except LossScaleFloorError:
            out.append("raise")
            break
    return out


@pytest.mark.parametrize("preset,new", [("deepspeed", True), ("deepspeed-0.17.0", False)])
def test_deepspeed_first_growth_needs_interval_plus_one_good_steps_from_0_17_1(preset: str, new: bool) -> None:
    spec = replace(SCALER_PRESETS[preset], init=2.0**4, interval=3)
    s = Scaler(spec)
    grows = [i + 1 for i in range(10) if s.update(F).event == "grow"]  # good steps counted from 1
    assert grows == ([4, 7, 10] if new else [3, 6, 9])
    s.update(T)  # held by hysteresis 2: the count restarts from the overflow
    grows = [i + 1 for i in range(7) if s.update(F).event == "grow"]
    assert grows == ([4, 7] if new else [3, 6])


@pytest.mark.parametrize("preset,new", [("deepspeed", True), ("deepspeed-0.17.0", False)])
@given(found=st.lists(st.booleans(), min_size=1, max_size=120))
def test_deepspeed_presets_are_deepspeed_step_by_step(preset: str, new: bool, found: list[bool]) -> None:
    spec = replace(SCALER_PRESETS[preset], init=2.0**6, interval=3)
    ours, ref = Scaler(spec), _DeepSpeed(2.0**6, 3, 1, 2, new)
    assert _until_raise(lambda f: ours.update(f).next_scale, found) == _until_raise(ref.update, found)


def test_megatron_grows_to_inf_in_fp32_and_cannot_back_off() -> None:
    """Megatron-LM multiplies its FP32 scale tensor by the growth factor unchecked: the state the
    ``max: ... cannot back off from inf`` verdict describes, which torch's GradScaler never enters."""
    scale, lo = torch.tensor([2.0**126]), torch.tensor([1.0])
    real = []
    for f in [F, F, T, T]:  # interval 1: every good step grows; hysteresis 1
        scale = torch.max(scale * 0.5, lo) if f else scale * 2.0
        real.append(scale.item())
    assert real == [2.0**127, math.inf, math.inf, math.inf]
    spec = replace(SCALER_PRESETS["megatron"], init=2.0**126, interval=1, hysteresis=1)
    assert _ours(spec, [F, F, T, T]) == real
    # in FP64 (DeepSpeed's Python float) the same growth is finite and backs off again
    assert _ours(replace(spec, store="fp64"), [F, F, T, T]) == [2.0**127, 2.0**128, 2.0**127, 2.0**126]


_HOSTILE = ["nan", "inf", "-inf", "1e400", "2^200", "2^-200", "-1", "0", "2.5", "2^31", "1e-320", "abc", "", "2^",
            "--1", "0x10"]


@given(key=st.sampled_from(["init", "growth", "backoff", "interval", "min", "max", "hysteresis", "floor", "store",
                            "to_inf", "first_growth"]),
       value=st.one_of(st.sampled_from(_HOSTILE), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                       st.integers(-2**70, 2**70).map(str)),
       kind=st.sampled_from(["dynamic", "gradscaler", "static"]))
def test_any_value_of_any_field_is_a_valid_spec_or_one_value_error(key: str, value: str, kind: str) -> None:
    text = f"static({value})" if kind == "static" else f"{kind}({key}={value})"
    try:
        spec = parse_scaler(text)
    except ValueError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    assert parse_scaler(str(spec)) == spec  # what parses prints back to itself
    assert 0 < spec.initial_scale < math.inf
