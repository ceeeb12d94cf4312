"""Verdicts: every outcome is reachable, and its reason cites the measured value and the bound."""
from __future__ import annotations

import pytest

from harness.values.formats import FORMATS
from harness.core.scaling import ScaleTrace, Scaler, parse_scaler
from harness.judge.tolerance import bound, describe
from harness.judge.verdict import FAILURES, OUTCOMES, SEVERITY, STALL_RATE, UNDERFLOW_BUDGET, Verdict, judge

F16, BF16 = FORMATS["fp16"], FORMATS["bf16"]


def _trace(spec: str, found: list[bool]) -> dict:
    """A scaler trace as compare() puts it in the metrics (a raise at the floor ends it)."""
    s, tr = Scaler(parse_scaler(spec)), ScaleTrace(str(parse_scaler(spec)))
    for f in found:
        try:
            tr.add(s.update(f))
        except Exception as exc:  # LossScaleFloorError: recorded as the Trainer does
            tr.raised = str(exc)
            break
    return tr.as_dict()


def test_pass_cites_the_error_and_the_bound() -> None:
    b = bound(F16, 4)
    v = judge({"rel_err": 1.0e-4}, F16, 4)
    assert (v.outcome, v.bound) == ("pass", b)
    assert v.reason == f"rel_err 1.00e-04 <= {b:.2e}"


def test_diverged_cites_value_bound_and_how_the_bound_was_formed() -> None:
    b = bound(F16, 4096)
    v = judge({"rel_err": 0.25}, F16, 4096)  # the bound is about 5.4*sqrt(4096)*2^-11 = 0.17
    assert v.outcome == "diverged"
    assert v.reason == f"rel_err 2.50e-01 > {b:.2e} = {describe(F16, 4096)}"
    assert "*sqrt(4096)*2^-11 (fp16)" in v.reason


def test_kappa_and_factor_widen_the_bound() -> None:
    m = {"rel_err": 5e-3}
    assert judge(m, F16, 4).outcome == "diverged"
    v = judge(m, F16, 4, kappa=3.0, factor=2.0)
    assert v.outcome == "pass" and v.bound == 6 * bound(F16, 4)


def test_gradient_and_loss_divergence() -> None:
    b = bound(BF16, 8)
    v = judge({"grad_rel_err": 0.5}, BF16, 8)
    assert v.outcome == "diverged" and v.reason.startswith(f"grad_rel_err 5.00e-01 > {b:.2e} = ")
    v = judge({"grad_rel_err": 1e-4, "loss_divergence": 0.25}, BF16, 8)
    assert v.outcome == "diverged" and v.reason.startswith(f"loss_divergence 2.50e-01 > {b:.2e}")


def test_fp64_reference_floor_replaces_a_tighter_bound() -> None:
    floor = 1e-2
    v = judge({"rel_err": 2e-2}, F16, 4, floor=floor)
    assert v.outcome == "diverged" and v.bound == floor
    assert v.reason == "rel_err 2.00e-02 > 1.00e-02 = FP32's own error against FP64 (the reference here)"
    assert judge({"rel_err": 5e-3}, F16, 4, floor=floor).outcome == "pass"


@pytest.mark.parametrize("key,what,total", [("nonfinite", "output", " of 8"), ("grad_nonfinite", "gradient", ""),
                                            ("loss_nonfinite", "loss", "")])
def test_overflow_counts_the_values_and_names_the_format_max(key: str, what: str, total: str) -> None:
    v = judge({key: 2, "numel": 8, "rel_err": 0.0}, F16, 4)
    assert v.outcome == "overflow"
    assert v.reason == f"{what}: 2{total} values inf/NaN where FP32 is finite (fp16 max 65504)"


def test_overflow_is_judged_before_underflow() -> None:
    assert judge({"nonfinite": 1, "numel": 4, "grad_underflow_frac": 0.5}, F16, 4).outcome == "overflow"


def test_underflow_of_gradients_and_of_output_mass() -> None:
    v = judge({"grad_underflow_frac": 0.25, "grad_rel_err": 0.9}, F16, 8)
    assert v.outcome == "underflow"
    assert v.reason == "gradient: 25% of non-zero values flushed to zero > budget 1% (fp16 smallest 5.96e-08)"
    v = judge({"underflow_mass": 0.125, "rel_err": 0.125}, F16, 8)
    assert v.outcome == "underflow" and v.reason.startswith("output: 12.5% of the norm flushed to zero > budget 1%")
    # a scenario may declare a larger budget (with its reason): then the same loss passes the underflow check
    assert judge({"grad_underflow_frac": 0.25, "grad_rel_err": 1e-4}, F16, 8, underflow_budget=0.3).outcome == "pass"
    assert UNDERFLOW_BUDGET == 0.01


def test_scale_exhausted_raise_at_the_floor() -> None:
    m = {"scaler": _trace("dynamic(init=2,min=1,interval=100,floor=raise)", [True] * 3)}
    v = judge(m, F16, 8)
    assert v.outcome == "scale_exhausted" and m["scale_direction"] == "min"
    assert v.reason.startswith("min:") and "floor scale 1 " in v.reason and "after 1 steps, 1 skipped" in v.reason


def test_scale_exhausted_stalled_at_the_floor() -> None:
    m = {"scaler": _trace("dynamic(init=2,min=1,interval=100)", [True] * 3)}
    v = judge(m, F16, 8)
    assert v.outcome == "scale_exhausted" and v.reason.startswith("min:")
    assert "floor scale 1 " in v.reason and "2 floor steps, 3 of 3 steps skipped" in v.reason


def test_scale_exhausted_when_the_scale_collapses_below_fp32_range() -> None:
    m = {"scaler": _trace("dynamic(init=2^-120,backoff=2^-10,interval=100)", [True, True])}
    v = judge(m, F16, 8)
    assert v.outcome == "scale_exhausted" and "collapsed from 2^-120 to 2^-130" in v.reason


def test_scale_exhausted_when_the_scale_grows_to_inf_in_its_fp32_store() -> None:
    """Only a policy that grows unchecked (Megatron-LM's FP32 tensor) reaches inf and stays there."""
    m = {"scaler": _trace("dynamic(megatron,init=2^127,interval=1,hysteresis=1)", [False, False, True])}
    v = judge(m, F16, 8)
    assert v.outcome == "scale_exhausted" and m["scale_direction"] == "max"
    assert v.reason.startswith("max: loss scale grew to 2^128, past FP32's max: the scale it holds is inf")
    assert v.reason.endswith("(a policy that grows unchecked, to_inf=allow); 1 of 3 steps skipped")


@pytest.mark.parametrize("spec", ["dynamic(torch,init=2^127,interval=1)",
                                  "dynamic(init=2^127,interval=1,store=fp64,to_inf=allow)"])
def test_a_scale_that_cannot_become_inf_is_not_exhausted_at_the_top(spec: str) -> None:
    """torch's GradScaler refuses a growth to inf (the scale stays 2^127); a Python float (DeepSpeed, apex)
    holds 2^128 finite, the scaled loss overflows and the scale backs off: neither is stuck at inf."""
    m = {"scaler": _trace(spec, [False] * 4 + [True, False, False]), "grad_rel_err": 1e-4}
    assert m["scaler"]["scale_nonfinite"] == 0
    v = judge(m, F16, 8)
    assert v.outcome == "pass", v.reason


def test_scale_exhausted_at_the_cap_while_gradients_underflow() -> None:
    m = {"scaler": _trace("dynamic(init=2^10,interval=1,max=2^11)", [False] * 3), "grad_underflow_frac": 0.5}
    v = judge(m, F16, 8)
    assert v.outcome == "scale_exhausted" and m["scale_direction"] == "max"
    assert "cap scale 2^11" in v.reason and "50% of non-zero values lost > budget 1%" in v.reason


def test_stalled_cites_the_skip_rate() -> None:
    m = {"scaler": _trace("dynamic(init=2^16,interval=100)", [True, True, True, False]), "grad_rel_err": 0.0}
    v = judge(m, F16, 8)
    assert v.outcome == "stalled"
    assert v.reason == "skip_rate 3/4 = 75% > 50%; scale 2^13..2^16"
    assert STALL_RATE == 0.5


def test_a_scaler_that_skips_a_few_steps_passes() -> None:
    m = {"scaler": _trace("dynamic(init=2^16,interval=100)", [True, False, False, False]), "grad_rel_err": 1e-4}
    assert judge(m, F16, 8).outcome == "pass"


def test_outcomes_are_typed() -> None:
    assert Verdict("unsupported", "needs sm_89+").outcome == "unsupported"
    assert Verdict("error", "RuntimeError: boom").reason == "RuntimeError: boom"
    with pytest.raises(ValueError, match="unknown outcome 'fine'; outcomes: pass, diverged"):
        Verdict("fine", "")
    assert set(SEVERITY) == set(OUTCOMES) and "pass" not in FAILURES and "unsupported" not in FAILURES


# -- nothing judged is never a pass; the margin ----------------------------------------------------------
@pytest.mark.parametrize("key, said", [("ref_nonfinite", "output 3 entries"),
                                       ("grad_ref_nonfinite", "gradient 3 entries"),
                                       ("loss_ref_nonfinite", "loss 3 steps")])
def test_an_undeclared_non_finite_reference_is_an_error(key: str, said: str) -> None:
    m = {key: 3, key.replace("ref_nonfinite", "nonfinite_mismatch"): 0, "rel_err": 0.0}
    v = judge(m, F16, 4)
    assert (v.outcome, v.bound, v.margin) == ("error", None, None)
    assert v.reason == (f"reference not finite ({said} inf/NaN) and the scenario declares no nonfinite_reference: "
                        "nothing can be judged against it")


def test_a_declared_non_finite_reference_must_be_matched_exactly() -> None:
    why = "masked logits are -inf by construction"
    v = judge({"ref_nonfinite": 4, "nonfinite_mismatch": 1, "rel_err": 2.0**-12}, F16, 4, nonfinite_reference=why)
    assert v.outcome == "diverged"
    assert v.reason == (f"output: 1 of the 4 values the reference holds as inf/NaN (declared: {why}) are something "
                        "else here")
    ok = judge({"ref_nonfinite": 4, "nonfinite_mismatch": 0, "rel_err": 2.0**-12}, F16, 4, nonfinite_reference=why)
    assert ok.outcome == "pass" and ok.margin == 2.0**-12 / bound(F16, 4)
    all_inf = judge({"ref_nonfinite": 4, "nonfinite_mismatch": 0, "nonfinite": 0, "numel": 4}, F16, 4,
                    nonfinite_reference=why)
    assert all_inf.outcome == "pass" and all_inf.margin is None
    assert all_inf.reason.startswith(f"every compared value is inf/NaN in the reference (declared: {why})")


def test_nothing_compared_is_an_error_not_a_pass() -> None:
    v = judge({"numel": 0}, F16, 4)
    assert (v.outcome, v.margin) == ("error", None)
    assert v.reason.startswith("nothing was compared: no rel_err, grad_rel_err or loss_divergence")


def test_an_all_zero_reference_says_why_the_error_is_infinite() -> None:
    v = judge({"rel_err": float("inf"), "ref_all_zero": True, "nonfinite": 0}, F16, 4)
    assert v.outcome == "diverged" and v.margin == float("inf")
    assert v.reason.startswith("rel_err inf (the reference is all zeros: relative error is undefined, and a "
                               "non-zero value counts as inf) > ")


def test_the_margin_is_the_worst_error_over_the_bound_judged_against() -> None:
    # the floor 2^-4 is the bound here (above the model's), so the margin is exact: 2^-6 / 2^-4
    v = judge({"rel_err": 2.0**-8, "grad_rel_err": 2.0**-6}, F16, 1, floor=2.0**-4)
    assert (v.outcome, v.bound, v.margin) == ("pass", 2.0**-4, 0.25)
    v = judge({"rel_err": 2.0**-2, "loss_divergence": 2.0**-3}, F16, 1, floor=2.0**-4)
    assert (v.outcome, v.margin) == ("diverged", 4.0)
    over = judge({"rel_err": float("inf"), "nonfinite": 2, "numel": 8}, F16, 1)
    assert over.outcome == "overflow" and over.margin == float("inf")
    assert judge({"grad_rel_err": 2.0**-5}, F16, 1, floor=2.0**-4).margin == 0.5
