"""Loss-scaling failure analysis: every dynamic policy driven to where it runs out of room, classified
with the direction and the evidence (suites/scaling_policies.py, harness.judge.verdict._scaling)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from harness.run.engine import run_case
from harness.core.execution import Execution
from harness.run.reference import ReferenceCache
from harness.core.scaling import SCALER_PRESETS, ScalerSpec
from harness.core.scenario import Case, discover, seed_generator
from harness.core.strategy import PRESETS
from suites.scaling_policies import BURST, policy_spec

CPU = torch.device("cpu")


def _case(name: str, **params) -> tuple[Case, dict]:
    s = discover().get(name)
    case = Case(s, params, 0)
    return case, s.inputs(params, seed_generator(case))


def _record(name: str, strategy: str, **params) -> dict:
    case, inputs = _case(name, **params)
    rec, _ = run_case(case, PRESETS[strategy], CPU, inputs, ReferenceCache())
    return rec


def test_policy_spec_time_compresses_the_presets_and_keeps_everything_else() -> None:
    own = PRESETS["fp16-dynamic"].scaler
    spec, note = policy_spec(own, "apex", "fp32", 2)
    assert spec == replace(SCALER_PRESETS["apex"], interval=2) and spec.max == 2.0**24
    assert note == "apex preset, time-compressed"
    gs, _ = policy_spec(PRESETS["fp16-gradscaler"].scaler, "gradscaler", "fp32", 8)
    assert gs == ScalerSpec("gradscaler", init=2.0**16, growth=2, backoff=0.5, interval=8)
    # the real GradScaler refuses FP16 gradients: pure FP16 weights keep their own scaler, and say so
    kept, note = policy_spec(PRESETS["fp16-pure"].scaler, "gradscaler", "fp16", 8)
    assert kept == replace(PRESETS["fp16-pure"].scaler, interval=8) and "refuses to unscale FP16" in note
    static = PRESETS["fp16-static"].scaler
    assert policy_spec(static, "apex", "fp32", 2) == (static, "the strategy's own scaler")
    with pytest.raises(ValueError, match="unknown scaler policy 'amd'"):
        policy_spec(own, "amd", "fp32", 2)


def test_apex_cap_is_exhausted_upwards_with_the_exact_lost_fraction() -> None:
    rec = _record("scaler_cap_underflow", "fp16-dynamic", policy="apex")
    case, inputs = _case("scaler_cap_underflow", policy="apex")
    g = inputs["g_w"].double()
    lost = float((g.abs() * 2.0**24 <= 2.0**-25).double().mean())  # flushed at the cap (a tie goes to zero)
    sc = rec["metrics"]["scaler"]
    assert rec["outcome"] == "scale_exhausted" and rec["metrics"]["scale_direction"] == "max"
    assert rec["reason"] == (f"max: at the cap scale 2^24 gradients still underflow: {100 * lost:.3g}% of non-zero "
                             "values lost > budget 1%")
    assert rec["metrics"]["grad_underflow_frac"] == lost and 0.5 < lost < 0.75
    # growth every 2 steps from 2^16: the cap is reached at step 16 and held
    assert sc["trajectory"][:17:2] == [2.0**k for k in range(16, 25)] and sc["scale_max"] == 2.0**24
    assert rec["window"]["lo_pow2"] > 2.0**24  # the reference window says the cap is too low


def test_uncapped_policy_grows_past_what_the_window_needs() -> None:
    rec = _record("scaler_cap_underflow", "fp16-dynamic", policy="torch")
    assert rec["outcome"] == "pass" and rec["metrics"]["scaler"]["scale_final"] >= rec["window"]["lo_pow2"]


def test_deepspeed_raises_at_its_floor_megatron_stalls_there() -> None:
    ds = _record("scaler_floor_overflow", "fp16-dynamic", policy="deepspeed")
    # hysteresis 2: one overflow held, then 16 backoffs from 2^16 to the floor 1, then the raise
    assert ds["outcome"] == "scale_exhausted" and ds["metrics"]["scale_direction"] == "min"
    assert ds["reason"] == ("min: gradients still overflow at the floor scale 1 and the policy raises there "
                            "(floor=raise): training stopped after 17 steps, 17 skipped")
    assert ds["metrics"]["scaler"]["raised"].startswith("gradient overflow at the minimum loss scale 1")
    mg = _record("scaler_floor_overflow", "fp16-dynamic", policy="megatron")
    sc = mg["metrics"]["scaler"]
    # from 2^32: one held overflow and 32 backoffs reach 1 at step 33; the other 31 of 64 steps stall there
    assert (sc["steps"], sc["skipped"], sc["floor_steps"], sc["scale_min"], sc["scale_max"]) == (64, 64, 31, 1, 2.0**32)
    assert mg["outcome"] == "scale_exhausted" and mg["reason"] == (
        "min: gradients still overflow at the floor scale 1 and the policy keeps skipping there (floor=stall): "
        "31 floor steps, 64 of 64 steps skipped")


def test_without_a_floor_the_scale_backs_off_below_one_and_trains() -> None:
    rec = _record("scaler_floor_overflow", "fp16-dynamic", policy="torch")
    sc = rec["metrics"]["scaler"]
    # it backs off exactly to the largest power of two the reference window allows, and trains there
    assert rec["outcome"] == "pass" and sc["scale_min"] == rec["window"]["hi_pow2"] == 2.0**-2
    assert sc["skip_rate"] < 0.5


def test_real_gradscaler_collapse_is_silent_and_applies_inf_gradients() -> None:
    """Below 2^-128, 1/scale is inf in FP32. torch.amp.GradScaler checks the *scaled* gradients for inf
    (0 and tiny values are finite), so after the burst it stops skipping, unscales to inf/NaN and steps."""
    case, inputs = _case("scaler_collapse_burst", policy="gradscaler")
    ex = Execution(PRESETS["fp16-gradscaler"], CPU)
    out = case.scenario.run(ex, inputs, case.params)
    tr = out.trace
    assert tr.scales[:BURST] == [2.0 ** (16 - k) for k in range(BURST)]  # exact halvings in its FP32 tensor
    assert all(tr.found_inf[:BURST]) and not any(tr.found_inf[BURST:])
    assert out.extra["nonfinite_params"] == 256 and not torch.isfinite(out.value).any()
    rec = _record("scaler_collapse_burst", "fp16-gradscaler", policy="gradscaler")
    assert rec["outcome"] == "scale_exhausted" and rec["reason"].startswith("min: loss scale collapsed from 2^16 to ")
    assert "1/scale overflows FP32" in rec["reason"] and "256 weights inf/NaN afterwards" in rec["reason"]


def test_own_scaler_collapse_skips_every_step_for_ever() -> None:
    rec = _record("scaler_collapse_burst", "fp16-dynamic", policy="torch")
    sc = rec["metrics"]["scaler"]
    # the scale is an FP32 number, as GradScaler's: 2^16 halved 166 times is 2^-150, which ties to 0
    assert (sc["steps"], sc["skipped"], sc["scale_final"], sc["trajectory"][165]) == (182, 182, 0.0, 2.0**-149)
    assert rec["reason"] == ("min: loss scale collapsed from 2^16 to 0 (below 2^-128 1/scale overflows FP32, so "
                             "the unscaled gradients are inf/NaN even when healthy); 182 of 182 steps skipped")
    assert rec["metrics"]["nonfinite_params"] == 0


def test_megatron_floor_rides_out_the_burst_and_stalls() -> None:
    rec = _record("scaler_collapse_burst", "fp16-dynamic", policy="megatron")
    sc = rec["metrics"]["scaler"]
    assert rec["outcome"] == "stalled" and (sc["skipped"], sc["floor_steps"]) == (BURST, BURST - 33)
    assert rec["reason"] == "skip_rate 150/182 = 82.4% > 50%, 117 of them at the floor before recovering; scale 1..2^32"
    assert sc["scale_final"] == 2.0**3  # the scale of the last step: 3 growths (every 8 good steps) after the burst

