"""Metrics on constructed tensors with known answers; inf/NaN injected at every position."""
from __future__ import annotations

import math

import pytest
import torch

from harness.values.formats import FORMATS
from harness.judge.metrics import compare, nonfinite_parts, output_problems, tensor_metrics, ulp, underflow_by_tensor
from harness.core.scaling import Scaler, ScaleTrace, parse_scaler
from harness.core.scenario import Output

F16, BF16, F32 = FORMATS["fp16"], FORMATS["bf16"], FORMATS["fp32"]


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def test_ulp_of_the_format() -> None:
    y = t(1.0, 1.5, 65504.0, 2.0**-14, 2.0**-20, 0.0, -4.0)
    assert ulp(y, F16).tolist() == [2.0**-10, 2.0**-10, 32.0, 2.0**-24, 2.0**-24, 2.0**-24, 2.0**-8]
    assert ulp(t(1.0), BF16).tolist() == [2.0**-7] and ulp(t(1.0), F32).tolist() == [2.0**-23]


def test_one_wrong_entry_gives_exact_errors() -> None:
    m = tensor_metrics(t(3.0, 4.0 + 2**-8), t(3.0, 4.0), F16)
    assert m["rel_err"] == 2**-8 / 5  # ||(0, 2^-8)|| / ||(3, 4)||
    assert m["max_abs_err"] == 2**-8 and m["max_rel_err"] == 2**-10
    assert m["ulp_err"] == 1.0  # the spacing of fp16 at 4 is 2^-8
    assert m["sqnr_db"] == 20 * math.log10(5 / 2**-8)
    assert (m["nonfinite"], m["overflow_frac"], m["underflow_frac"], m["underflow_mass"], m["numel"]) == (0, 0, 0, 0, 2)


def test_identical_tensors() -> None:
    x = t(1.0, -2.0, 2.0**-20)
    m = tensor_metrics(x, x.clone(), F16)
    assert (m["rel_err"], m["max_abs_err"], m["ulp_err"], m["sqnr_db"]) == (0.0, 0.0, 0.0, math.inf)


def test_underflow_counts_and_mass() -> None:
    ref, cand = t(2.0**-30, 1.0, 0.0, 2.0), t(0.0, 1.0, 0.0, 2.0)
    m = tensor_metrics(cand, ref, F16)
    assert m["underflow_frac"] == 1 / 3  # three non-zero values in the reference, one lost
    norm = math.sqrt(2.0**-60 + 5)
    assert m["underflow_mass"] == 2.0**-30 / norm and m["rel_err"] == 2.0**-30 / norm
    assert m["nonfinite"] == 0


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("pos", range(4))
def test_non_finite_candidate_at_every_position(bad: float, pos: int) -> None:
    ref = t(1.0, -2.0, 3.0, 0.5)
    cand = ref.clone()
    cand[pos] = bad
    m = tensor_metrics(cand, ref, F16)
    assert (m["nonfinite"], m["overflow_frac"]) == (1, 0.25)
    assert m["rel_err"] == m["max_abs_err"] == m["max_rel_err"] == m["ulp_err"] == math.inf
    assert m["sqnr_db"] == -math.inf and m["underflow_frac"] == 0.0


@pytest.mark.parametrize("pos", range(4))
def test_entries_non_finite_in_the_reference_are_not_judged(pos: int) -> None:
    ref = t(1.0, -2.0, 3.0, 0.5)
    ref[pos] = math.inf
    cand = ref.clone()
    cand[pos] = 7.0  # whatever the candidate holds there
    cand[(pos + 1) % 4] += 2**-6
    m = tensor_metrics(cand, ref, F16)
    finite_norm = math.sqrt(sum(v * v for i, v in enumerate((1.0, -2.0, 3.0, 0.5)) if i != pos))
    assert m["nonfinite"] == 0 and m["overflow_frac"] == 0.0
    assert m["rel_err"] == pytest.approx(2**-6 / finite_norm, rel=1e-15)


def test_shape_mismatch_is_an_error_naming_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"candidate shape \(3,\) differs from the reference's \(2,\)"):
        tensor_metrics(t(1, 2, 3), t(1, 2), F16)


def test_compare_gradients_losses_and_trace() -> None:
    ref = Output(value=t(1.0, 2.0), grads={"a": t(1.0, 2.0**-30), "b": t(4.0)}, losses=[1.0, 0.5])
    tr = ScaleTrace("dynamic")
    sc = Scaler(parse_scaler("dynamic(init=8,interval=100)"))
    for f in (True, False):
        tr.add(sc.update(f))
    cand = Output(value=t(1.0, 2.0), grads={"a": t(1.0, 0.0), "b": t(4.0)}, losses=[1.0, 0.75], trace=tr)
    m = compare(cand, ref, F16)
    assert m["rel_err"] == 0.0
    assert m["grad_underflow_frac"] == 1 / 3 and m["grad_underflow_by_tensor"] == {"a": 0.5}
    assert m["grad_nonfinite"] == 0 and m["grad_rel_err"] == 2.0**-30 / math.sqrt(17 + 2.0**-60)
    assert (m["loss_divergence"], m["final_loss_ratio"], m["loss_nonfinite"], m["loss_steps"]) == (0.5, 1.5, 0, 2)
    assert m["scaler"]["trajectory"] == [8, 4]
    assert (m["scaler"]["skipped"], m["scaler"]["scale_final"]) == (1, 4)


@pytest.mark.parametrize("pos", range(3))
def test_a_non_finite_loss_at_every_step(pos: int) -> None:
    losses = [1.0, 0.5, 0.25]
    cand = list(losses)
    cand[pos] = math.nan
    m = compare(Output(losses=cand), Output(losses=losses), F16)
    assert m["loss_nonfinite"] == 1 and m["loss_divergence"] == math.inf


@pytest.mark.parametrize("pos", range(3))
def test_a_non_finite_gradient_at_every_position(pos: int) -> None:
    g = t(1.0, -0.5, 0.25)
    bad = g.clone()
    bad[pos] = math.inf
    m = compare(Output(grads={"w": bad}), Output(grads={"w": g}), F16)
    assert m["grad_nonfinite"] == 1 and m["grad_overflow_frac"] == 1 / 3 and m["grad_rel_err"] == math.inf


def test_compare_refuses_missing_outputs() -> None:
    with pytest.raises(ValueError, match="no value where the reference has one"):
        compare(Output(grads={"w": t(1.0)}), Output(value=t(1.0)), F16)
    with pytest.raises(ValueError, match="no gradient for b"):
        compare(Output(grads={"a": t(1.0)}), Output(grads={"a": t(1.0), "b": t(2.0)}), F16)


def test_underflow_by_tensor_equals_each_tensors_own_underflow_frac() -> None:
    """The one-pass computation against tensor_metrics on each tensor: zeros, infs, NaNs, an empty tensor,
    a tensor that lost nothing, and one only in the reference."""
    g = torch.Generator().manual_seed(3)
    ref, cand = {}, {}
    for k, n in [("w", 200), ("b", 7), ("empty", 0), ("whole", 50), ("odd", 31)]:
        r = torch.randn(n, generator=g) * 2.0 ** torch.randint(-30, 5, (n,), generator=g)
        c = torch.where(r.abs() < 2.0**-14, torch.zeros_like(r), r)  # FP16-like flush of the small ones
        if k == "odd":
            r[0], r[1], c[2], r[3] = float("inf"), 0.0, float("nan"), float("nan")
        if k == "whole":
            r = r.abs() + 1.0
            c = r.clone()
        ref[k], cand[k] = r.reshape(-1, 1) if k == "odd" else r, c.reshape(-1, 1) if k == "odd" else c
    ref["only_ref"] = torch.ones(3)
    got = underflow_by_tensor(cand, ref, F16)
    # an empty tensor is refused by tensor_metrics (nothing to compare) and loses nothing in the pool
    want = {k: tensor_metrics(cand[k], ref[k], F16)["underflow_frac"] for k in ref if k in cand and ref[k].numel()}
    assert {k: v for k, v in want.items() if v > 0} == got and "empty" not in got
    assert set(got) == {"w", "b", "odd"} and all(0 < v <= 1 for v in got.values()) and 0 < got["w"] < 1
    with pytest.raises(ValueError, match="shape"):
        underflow_by_tensor({"w": cand["w"][:10]}, {"w": ref["w"]}, F16)


# -- what cannot be compared (module doc): each rule, with the value it must give ------------------------
INF, NAN = math.inf, math.nan


@pytest.mark.parametrize("cand_at, mismatch", [(INF, 0), (-INF, 1), (NAN, 1), (2.0, 1)],
                         ids=["same-inf", "other-inf", "nan-for-inf", "finite-for-inf"])
def test_a_non_finite_reference_entry_is_matched_by_class_not_measured(cand_at: float, mismatch: int) -> None:
    ref, cand = t(1.0, INF, 4.0, NAN), t(1.0 + 2**-10, cand_at, 4.0, NAN)  # NaN matches NaN
    m = tensor_metrics(cand, ref, F16)
    assert (m["ref_nonfinite"], m["nonfinite_mismatch"], m["nonfinite"]) == (2, mismatch, 0)
    assert m["rel_err"] == 2**-10 / math.sqrt(17.0)  # over the two finite reference entries only


def test_a_reference_with_no_finite_entry_gives_no_error_metric() -> None:
    m = tensor_metrics(t(INF, NAN), t(INF, NAN), F16)
    assert m == {"numel": 2, "ref_nonfinite": 2, "nonfinite_mismatch": 0, "nonfinite": 0}


def test_an_all_zero_reference_is_exact_or_infinitely_wrong() -> None:
    exact = tensor_metrics(t(0.0, 0.0, 0.0), t(0.0, 0.0, 0.0), F16)
    assert (exact["rel_err"], exact["ref_all_zero"], exact["sqnr_db"]) == (0.0, True, math.inf)
    assert "max_rel_err" not in exact and exact["underflow_frac"] == 0.0  # no non-zero entry: undefined / none lost
    off = tensor_metrics(t(0.0, 2.0**-30, 0.0), t(0.0, 0.0, 0.0), F16)
    assert (off["rel_err"], off["max_abs_err"], off["ref_all_zero"]) == (math.inf, 2.0**-30, True)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_integer_bool_and_complex_outputs_are_refused(dtype: torch.dtype) -> None:
    x = torch.tensor([1, 0, 1]).to(dtype)
    with pytest.raises(TypeError, match=f"the reference has dtype {dtype}: only real floating-point"):
        tensor_metrics(t(1.0, 0.0, 1.0), x, F16)
    with pytest.raises(TypeError, match=f"the candidate has dtype {dtype}"):
        tensor_metrics(x, t(1.0, 0.0, 1.0), F16)


def test_an_empty_reference_is_refused() -> None:
    with pytest.raises(ValueError, match=r"the reference has no entries \(shape \(0, 3\)\): nothing to compare"):
        tensor_metrics(torch.empty(0, 3), torch.empty(0, 3), F16)


def test_gradients_carry_the_same_rules() -> None:
    ref = {"w": t(1.0, 2.0), "b": t(NAN, 4.0)}
    m = compare(Output(grads={"w": t(1.0, 2.0), "b": t(3.0, 4.0)}), Output(grads=ref), F16)
    assert (m["grad_ref_nonfinite"], m["grad_nonfinite_mismatch"], m["grad_rel_err"]) == (1, 1, 0.0)


def test_a_loss_curve_against_a_non_finite_or_zero_reference() -> None:
    m = compare(Output(losses=[2.0, NAN, 0.0, 5.0]), Output(losses=[2.5, NAN, 0.0, INF]), F16)
    assert (m["loss_ref_nonfinite"], m["loss_nonfinite_mismatch"]) == (2, 1)  # 5.0 is not inf
    assert m["loss_divergence"] == 0.2 and m["loss_nonfinite"] == 0  # step 0 only; step 2 is 0 == 0
    assert "final_loss_ratio" not in m  # the reference's last loss is inf
    m = compare(Output(losses=[1.0, 2.0**-20]), Output(losses=[1.0, 0.0]), F16)
    assert m["loss_divergence"] == math.inf  # any loss against a reference of exactly 0
    none = compare(Output(losses=[INF, NAN]), Output(losses=[INF, NAN]), F16)
    assert "loss_divergence" not in none and none["loss_nonfinite_mismatch"] == 0


def test_a_candidate_without_the_reference_s_loss_curve_is_refused_or_infinite() -> None:
    with pytest.raises(ValueError, match="no loss curve where the reference has one"):
        compare(Output(value=t(1.0)), Output(value=t(1.0), losses=[1.0]), F16)
    assert compare(Output(losses=[]), Output(losses=[1.0, 0.5]), F16)["loss_divergence"] == math.inf


def test_output_problems_name_what_cannot_be_a_reference() -> None:
    assert output_problems(Output(value=t(1.0), grads={"w": t(2.0)}, losses=[1.0])) == []
    assert output_problems(Output()) == ["it holds no value, gradients or loss curve: nothing to compare"]
    assert output_problems(Output(value=torch.empty(0, 2))) == ["value has no entries (shape (0, 2))"]
    got = output_problems(Output(value=torch.tensor([1, 2]), grads={"w": torch.empty(0), "k": 3.0}))
    assert got[0].startswith("value has dtype torch.int64: only real floating-point")
    assert got[1:] == ["gradient k is a float, not a tensor", "the gradients have no entries"]
    assert output_problems(Output(grads={"w": torch.empty(0)})) == ["the gradients have no entries"]


def test_nonfinite_parts_say_which_output_and_where() -> None:
    v = torch.ones(2, 3)
    v[1, 2] = -INF
    v[1, 0] = NAN
    out = Output(value=v, grads={"w": t(1.0), "b": t(2.0, INF)}, losses=[1.0, NAN, INF, 0.5])
    assert nonfinite_parts(out) == ["value: 2 of 6 entries inf/NaN (first at (1, 0): nan)",
                                    "gradient b: 1 of 2 entries inf/NaN (first at (1,): inf)",
                                    "loss at steps 1, 2 of 4 (nan, inf)"]
    assert nonfinite_parts(Output(value=t(1.0), losses=[1.0])) == []


def test_updates_lost_beyond_the_reference_is_exact_at_the_budget():
    """56 of 100 against 55 of 100 is exactly the 1% budget: not a loss beyond it (the difference of the
    rounded shares, 0.56 - 0.55, is 0.010000000000000009)."""
    from harness.core.scenario import Output
    from harness.judge.verdict import judge
    fp16 = FORMATS["fp16"]
    v = torch.tensor([1.0, 2.0])

    def out(lost: int) -> Output:
        return Output(value=v, extra={"updates_lost": lost / 100, "updates_lost_of": [lost, 100]})
    m = compare(out(56), out(55), fp16)
    assert m["updates_lost_excess"] == 0.01
    assert judge({**m, "updates_lost": 0.56}, fp16, 1).outcome == "pass"
    m = compare(out(57), out(55), fp16)
    assert judge({**m, "updates_lost": 0.57}, fp16, 1).outcome == "diverged"
