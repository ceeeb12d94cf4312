"""The failure mechanisms the reduction, tiny_gradient and exploding_loss scenarios claim, proved with exact
numbers: first on the kernels and data they are built from, then on the records the engine writes."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import declared_outcome
from harness.run.engine import RunConfig, run_case, run_matrix
from harness.core.execution import Execution
from harness.values.formats import FORMATS, quantize
from harness.run.reference import ReferenceCache
from harness.results import read_run
from harness.core.scenario import Case, discover, seed_generator
from harness.core.strategy import PRESETS, parse
from harness.judge.window import scale_window
from suites._models import REALISTIC_SHARES, blocked_prefix_sums, blocked_sum, ema, one_pass_layernorm, realistic_gradients, rms_norm

CPU = torch.device("cpu")
H, B = torch.float16, torch.bfloat16
FP16 = FORMATS["fp16"]


@pytest.fixture(scope="module")
def reg():
    return discover()


def record(reg, name: str, strategy: str, seed: int = 0, **params) -> dict:
    """One case of a registered scenario under one strategy, judged by the engine."""
    s = reg.get(name)
    case = Case(s, params, seed)
    rec, _ = run_case(case, parse(strategy), CPU, s.inputs(params, seed_generator(case)), ReferenceCache())
    assert rec["outcome"] != "error", rec.get("traceback")
    return rec


def ratio(rec: dict) -> float:
    return rec["metrics"]["rel_err"] / rec["bound"]


# -- reduction -----------------------------------------------------------------------------------------
def test_logits_round_at_their_magnitude_not_at_their_spread() -> None:
    z = torch.randn(1 << 16, generator=torch.Generator().manual_seed(1))
    err = (quantize(300 + z, "fp16") - (300 + z)).abs()
    assert float(err.max()) <= 2.0**-3 and float(err.max()) > 0.99 * 2.0**-3  # ulp(300) = 2^-2 in FP16
    assert float((quantize(300 + z, "bf16") - (300 + z)).abs().max()) <= 1.0  # ulp(300) = 2 in BF16


def test_softmax_fails_at_offset_30_in_fp16_and_bf16_alike(reg) -> None:
    p = {"n": 4096, "offset": 30.0}
    r16, rb = record(reg, "softmax_long", "fp16", **p), record(reg, "softmax_long", "bf16", **p)
    assert r16["outcome"] == rb["outcome"] == "diverged"
    assert ratio(r16) == pytest.approx(ratio(rb), rel=0.1)  # error and bound both scale with u
    assert record(reg, "softmax_long", "fp16", n=4096, offset=4.0)["outcome"] == "pass"
    assert record(reg, "softmax_long", "fp16", n=4096, offset=1e5)["outcome"] == "overflow"


def test_cross_entropy_of_a_confident_target_fails_and_of_a_random_one_passes(reg) -> None:
    top = record(reg, "cross_entropy_vocab", "fp16", n=8192, scale=16.0, target="top")
    rnd = record(reg, "cross_entropy_vocab", "fp16", n=8192, scale=16.0, target="random")
    assert top["outcome"] == "diverged" and ratio(top) > 2
    assert rnd["outcome"] == "pass" and ratio(rnd) < 0.2


def test_fp16_exp_and_sum_overflow_without_the_max_shift(reg) -> None:
    assert math.isfinite(torch.exp(torch.tensor(11.08, dtype=H)).item())  # ln(65504) = 11.0898
    assert torch.exp(torch.tensor(11.1, dtype=H)).item() == math.inf
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(2)).to(H)
    e = torch.exp(x)
    assert bool(torch.isfinite(e).all()) and e.sum().item() == math.inf  # sum ~ 2^16 * e^0.5 = 1.08e5
    assert record(reg, "logsumexp_long", "fp16", impl="naive", n=65536, scale=1.0)["outcome"] == "overflow"
    assert record(reg, "logsumexp_long", "fp16", impl="torch", n=65536, scale=1.0)["outcome"] == "pass"


def test_one_pass_variance_is_quantised_to_the_ulp_of_offset_squared() -> None:
    x = quantize(12 + torch.randn(8, 1024, generator=torch.Generator().manual_seed(3)), "bf16")
    for dt, ulp in ((B, 1.0), (H, 2.0**-3)):  # ulp of ~144 (in [128, 256))
        xd = x.to(dt)
        m, m2 = xd.mean(-1), (xd * xd).mean(-1)
        var = (m2 - m * m).double()
        assert bool(((var / ulp) == torch.round(var / ulp)).all())  # the true variance, ~1, is lost below ulp
    y = one_pass_layernorm(x.to(B)).double()
    assert float(y.abs().max()) > 50  # BF16's variance cancelled to 0: the output is scaled by 1/sqrt(eps)


def test_torch_layernorm_passes_where_the_one_pass_formula_fails(reg) -> None:
    assert record(reg, "layernorm_formula", "bf16", impl="torch", offset=12.0)["outcome"] == "pass"
    one = record(reg, "layernorm_formula", "fp16", impl="one_pass", offset=12.0)
    assert one["outcome"] == "diverged" and ratio(one) > 5
    assert record(reg, "layernorm_formula", "fp16", impl="one_pass", offset=3.0)["outcome"] == "pass"


def test_layernorm_input_rounding_is_the_same_failure_in_fp16_and_bf16(reg) -> None:
    r16 = record(reg, "layernorm_offset", "fp16", n=1024, offset=30.0)
    rb = record(reg, "layernorm_offset", "bf16", n=1024, offset=30.0)
    assert r16["outcome"] == rb["outcome"] == "diverged"
    assert ratio(r16) == pytest.approx(ratio(rb), rel=0.05)  # ~0.12 * 2^floor(log2 30) = 1.9 for both
    assert record(reg, "layernorm_offset", "fp16", n=1024, offset=3.0)["outcome"] == "pass"


def test_fp16_squares_overflow_past_255_9(reg) -> None:
    assert (torch.tensor(255.875, dtype=H) ** 2).item() == 65472.0
    assert (torch.tensor(256.0, dtype=H) ** 2).item() == math.inf
    _, rms = rms_norm(torch.full((1, 4), 300.0, dtype=H), H)
    assert rms.item() == math.inf
    _, rms32 = rms_norm(torch.full((1, 4), 300.0, dtype=H), torch.float32)
    assert rms32.item() == 300.0
    rec = record(reg, "rmsnorm_offset", "fp16", stat="compute", offset=300.0)
    assert rec["outcome"] == "overflow" and rec["metrics"]["nonfinite"] == 8  # the 8 rows' statistics
    assert record(reg, "rmsnorm_offset", "fp16", stat="fp32", offset=300.0)["outcome"] == "pass"


def test_activation_rounding_adds_ulp_squared_over_12_to_the_variance(reg) -> None:
    z = torch.randn(1 << 18, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for offset, fmt, ulp in ((1000.0, "fp16", 0.5), (150.0, "bf16", 1.0)):
        x = offset + z
        added = float(quantize(x.float(), fmt).double().var() - x.var())
        assert added == pytest.approx(ulp**2 / 12, rel=0.15)
    assert record(reg, "batchnorm_stats", "bf16", batch=128, offset=150.0)["outcome"] == "diverged"
    assert record(reg, "batchnorm_stats", "fp16", batch=128, offset=150.0)["outcome"] == "pass"


def test_a_low_precision_running_average_stalls_half_an_ulp_short() -> None:
    s = torch.tensor([3.0], dtype=H)  # ulp 2^-9 in [2, 4): increments <= 2^-10 are lost
    assert ema(s, torch.tensor([[3.97]]), 0.001).item() == 3.0  # 0.001 * 0.97 < 2^-10
    assert ema(s, torch.tensor([[4.0]]), 0.001).item() == 3.0 + 2.0**-9  # 0.001 * 1.0 > 2^-10
    target = torch.full((2000, 1), 3.5)
    assert ema(torch.zeros(1, dtype=H), target, 0.001).item() == 2.5234375  # 0.001*(3.5 - r) = 2^-10: a tie
    assert ema(torch.zeros(1, dtype=B), target, 0.001).item() == 1.0  # half an ulp of [1, 2) is 2^-8 > 0.0025
    assert ema(torch.ones(1, dtype=B), torch.full((2000, 1), 0.5), 0.001).item() == 1.0  # 0.0005 < 2^-9 below 1
    assert ema(torch.zeros(1), target, 0.001).item() == pytest.approx(3.5 * (1 - 0.999**2000), rel=1e-5)


def test_master_weights_do_not_cover_batchnorm_buffers(reg) -> None:
    assert record(reg, "batchnorm_running", "bf16-master", momentum=0.001)["outcome"] == "diverged"
    assert record(reg, "batchnorm_running", "bf16", momentum=0.001)["outcome"] == "pass"  # FP32 buffers
    assert record(reg, "batchnorm_running", "fp16-pure", momentum=0.1)["outcome"] == "pass"


def test_low_precision_lanes_stagnate_at_a_power_of_two() -> None:
    x = torch.rand(1 << 23, generator=torch.Generator().manual_seed(5))  # 2048 values of ~0.5 per lane
    assert bool((blocked_sum(x.to(B), 4096) == 256).all())  # from 256 on, half an ulp (1) exceeds every x
    assert (torch.tensor(2048.0, dtype=H) + torch.tensor(0.99, dtype=H)).item() == 2048.0
    assert x[: 1 << 17].to(H).sum().item() == math.inf  # 2^17 values of mean 0.5: 65536 > 65504


def test_lane_sums_at_marks_are_the_prefix_sums_of_one_pass() -> None:
    """The running sums at each mark, taken in one pass, are bit for bit the sums of each prefix added row
    by row in FP16 (where the order of additions shows in the bits), and blocked_sum is the last of them."""
    x = (torch.rand(64 * 16, generator=torch.Generator().manual_seed(7)) * 3).to(H)
    rows = x.reshape(64, 16)
    marks = (1, 4, 16, 64)
    snaps = blocked_prefix_sums(x, 16, marks)
    assert list(snaps) == list(marks)
    for m in marks:
        ref = rows[0]
        for r in rows[1:m]:
            ref = ref + r  # one FP16 rounding per addition
        assert torch.equal(snaps[m], ref), m
    assert torch.equal(blocked_sum(x, 16), snaps[64]) and not torch.equal(snaps[4], snaps[16])
    assert not torch.equal(snaps[64], rows.float().sum(0).to(H))  # FP16 lanes lose what an FP32 sum keeps


def test_same_sign_sums_fail_and_zero_mean_sums_pass(reg) -> None:
    p = {"n": 2**24, "op": "mean"}
    same = record(reg, "sum_long", "bf16", data="same_sign", **p)
    assert same["outcome"] == "diverged" and same["metrics"]["rel_err"] == pytest.approx(0.875, abs=1e-3)  # 256/2048
    zero = record(reg, "sum_long", "bf16", data="zero_mean", **p)
    assert zero["outcome"] == "pass" and zero["metrics"]["rel_err"] < 0.25
    assert record(reg, "sum_long", "fp16", data="same_sign", n=2**20, op="sum")["outcome"] == "overflow"


# -- tiny_gradient ---------------------------------------------------------------------------------------
def test_realistic_distribution_has_the_claimed_shares() -> None:
    t = realistic_gradients(10000, torch.Generator().manual_seed(6)).abs()
    assert int((t == 0).sum()) == 6700
    assert int(((t > 0) & (t < 2.0**-24)).sum()) == 3100 == int(REALISTIC_SHARES["below"][0] * 10000)
    assert int((t >= 2.0**-24).sum()) == 200 and float(t.max()) < 2.0**-8
    flushed = quantize(t, "fp16") == 0
    assert bool((flushed == (t <= 2.0**-25)).all())  # round to nearest: exactly the values up to 2^-25 flush


def test_fp16_flushes_exactly_the_gradients_below_2_to_minus_25(reg) -> None:
    s = reg.get("realistic_grad_distribution")
    params = {"n": 10000}
    t = s.inputs(params, seed_generator(Case(s, params, 0)))["t"].abs()
    nonzero = int((t > 0).sum())
    lost = {}
    for strategy, log2_scale in (("fp16", 0), ("fp16-static", 10), ("fp16-dynamic", 16)):
        rec = record(reg, "realistic_grad_distribution", strategy, **params)
        lost[strategy] = int(((t > 0) & (t * 2.0**log2_scale <= 2.0**-25)).sum()) / nonzero
        assert rec["metrics"]["grad_underflow_frac"] == lost[strategy]
        assert rec["outcome"] == ("underflow" if lost[strategy] > 0.01 else "pass")
    assert 0.85 < lost["fp16"] < 0.9 and 0.27 < lost["fp16-static"] < 0.32  # 15/16 and 5/16 of 31/33
    assert lost["fp16-dynamic"] == 0  # at 2^16 even 2^-40 becomes 2^-24


def test_sweep_is_decided_by_log2_grad_plus_log2_scale(reg) -> None:
    gone = record(reg, "grad_magnitude_sweep", "fp16", log2_grad=-26)
    assert gone["outcome"] == "underflow" and gone["metrics"]["grad_underflow_frac"] == 1.0  # 2^-26*1.5 < 2^-25
    few_bits = record(reg, "grad_magnitude_sweep", "fp16", log2_grad=-22)
    assert few_bits["outcome"] == "diverged" and few_bits["metrics"]["grad_underflow_frac"] == 0.0
    assert record(reg, "grad_magnitude_sweep", "fp16-static", log2_grad=-32)["outcome"] == "diverged"  # e = -22
    assert record(reg, "grad_magnitude_sweep", "fp16-dynamic", log2_grad=-32)["outcome"] == "pass"  # e = -16


def _layer_log2_max(rec_grads: dict) -> list[float]:
    return [math.log2(float(g.abs().max())) for g in rec_grads.values()]


def test_deep_narrow_gradients_vanish_layer_by_layer(reg) -> None:
    s = reg.get("deep_narrow_vanishing")
    for depth in (16, 24):
        params = {"depth": depth}
        case = Case(s, params, 0)
        ref = s.run(Execution(parse("fp32")), s.inputs(params, seed_generator(case)), params)
        log2max = _layer_log2_max(ref.grads)
        slope = (log2max[-1] - log2max[0]) / (depth - 1)
        assert 1.8 < slope < 2.4  # sigmoid' <= 1/4: ~2 binades per layer
        spread = log2max[-1] - log2max[0]  # binades between the last and the first layer's largest gradient
        assert (spread > FP16.dynamic_range_log2) == (depth == 24)  # FP16 spans 40: 65504 / 2^-24
        assert scale_window(ref.grads).empty == (depth == 24)  # no single loss scale keeps every layer
        rec = record(reg, "deep_narrow_vanishing", "fp16", depth=depth)
        lost = rec["metrics"]["grad_underflow_by_tensor"]
        flushed = [name for name, m in zip(ref.grads, log2max) if m < -26]  # every gradient below 2^-25
        assert flushed and all(lost[name] == 1.0 for name in flushed)
        assert rec["outcome"] == "underflow"
    # at 2^16 the first layer keeps all but its smallest gradients: few in the pool, beyond the budget in
    # `layers.0` alone, which the per-tensor rule names
    rec = record(reg, "deep_narrow_vanishing", "fp16-dynamic", depth=16)
    assert rec["metrics"]["grad_underflow_frac"] < 0.01 < rec["metrics"]["grad_underflow_by_tensor"]["layers.0"]
    assert rec["outcome"] == "underflow" and rec["reason"].startswith("gradient of `layers.0`: ")
    assert record(reg, "deep_narrow_vanishing", "fp16-dynamic", depth=24)["outcome"] == "underflow"


# -- exploding_loss -------------------------------------------------------------------------------------
def test_an_fp16_loss_overflows_whatever_the_scaler_and_65536_is_inf_in_fp16(reg) -> None:
    assert torch.tensor(65536.0).to(H).item() == math.inf  # the initial scale as the FP16 loss's gradient
    rec = record(reg, "loss_past_fp16_max", "fp16-dynamic", log2_loss=17)
    sc = rec["metrics"]["scaler"]
    assert rec["outcome"] == "overflow" and rec["metrics"]["grad_nonfinite"] == 0
    assert sc["skipped"] == 1 and sc["trajectory"] == [2.0**16, 2.0**15, 2.0**15, 2.0**15]
    assert record(reg, "loss_past_fp16_max", "fp16-dynamic", log2_loss=12)["outcome"] == "pass"


@pytest.mark.parametrize("log2_grad", [2, 6, 10])
def test_a_dynamic_scaler_backs_off_log2_grad_plus_one_times(reg, log2_grad: int) -> None:
    rec = record(reg, "scaled_grad_overflow", "fp16-dynamic", log2_grad=log2_grad, steps=16)
    sc = rec["metrics"]["scaler"]
    assert sc["skipped"] == log2_grad + 1 and sc["scale_final"] == 2.0 ** (15 - log2_grad)
    assert rec["outcome"] == ("stalled" if (log2_grad + 1) / 16 > 0.5 else "pass")
    static = record(reg, "scaled_grad_overflow", "fp16-static", log2_grad=log2_grad, steps=16)
    assert static["outcome"] == ("stalled" if log2_grad >= 6 else "pass")  # 1.5 * 2^(10+log2_grad) > 65504


def test_a_forward_overflow_exhausts_every_dynamic_policy(reg) -> None:
    p = {"log2_act": 17, "steps": 160}
    torch_policy = record(reg, "activation_overflow", "fp16-dynamic", **p)["metrics"]["scaler"]
    assert torch_policy["skipped"] == 160 and torch_policy["scale_final"] == 2.0 ** (16 - 159)
    ds = record(reg, "activation_overflow", "compute=fp16,scaler=deepspeed", **p)
    # hysteresis 2: step 0 holds, steps 1..16 halve 2^16 down to the floor 1, step 17 raises there
    assert ds["outcome"] == "scale_exhausted" and ds["metrics"]["scaler"]["steps"] == 17
    assert ds["metrics"]["scaler"]["raised"]
    mg = record(reg, "activation_overflow", "compute=fp16,scaler=megatron", **p)["metrics"]["scaler"]
    assert mg["floor_steps"] == 160 - 33  # from 2^32: one hold, 32 backoffs, then the floor
    assert record(reg, "activation_overflow", "fp16-dynamic", log2_act=15, steps=160)["outcome"] == "pass"
    assert record(reg, "activation_overflow", "bf16", **p)["outcome"] == "pass"


def test_grown_logits_keep_a_handful_of_values_in_fp16(reg) -> None:
    s = reg.get("attention_logit_growth")
    params = {"logit_max": 1e4}
    inp = s.inputs(params, seed_generator(Case(s, params, 0)))
    logits = inp["q"].double() @ inp["k"].double().t()
    assert torch.equal((inp["q"] @ inp["k"].t()).double(), logits)  # exact in FP32: a trustworthy reference
    rounded = quantize(logits.float(), "fp16")
    distinct = max(len(torch.unique(row)) for row in rounded)
    assert distinct <= 6 < min(len(torch.unique(row)) for row in logits)  # ulp(1e4) = 8 against a spread of 2
    assert record(reg, "attention_logit_growth", "fp16", logit_max=7e4)["outcome"] == "overflow"
    assert record(reg, "attention_logit_growth", "bf16", logit_max=100.0)["outcome"] == "diverged"
    assert record(reg, "attention_logit_growth", "fp16", logit_max=1.0)["outcome"] == "pass"


def test_a_one_step_spike_is_skipped_exactly_once(reg) -> None:
    rec = record(reg, "grad_spike", "fp16-dynamic", log2_spike=8, steps=8)
    assert rec["outcome"] == "pass" and rec["metrics"]["skipped_at"] == [3]
    assert rec["metrics"]["scaler"]["trajectory"] == [2.0**16] * 4 + [2.0**15] * 4
    assert record(reg, "grad_spike", "fp16-static", log2_spike=8, steps=8)["metrics"]["skipped_at"] == []
    assert record(reg, "grad_spike", "fp16-static", log2_spike=20, steps=8)["metrics"]["skipped_at"] == [3]
    plain = record(reg, "grad_spike", "fp16", log2_spike=20, steps=8)  # 2^-4 * 2^20 = 65536: inf, applied
    assert plain["outcome"] == "overflow" and plain["metrics"]["loss_nonfinite"] == 4  # NaN weights from step 4


# -- the declarations match what runs ---------------------------------------------------------------------
MINE = ("softmax_long", "cross_entropy_vocab", "logsumexp_long", "layernorm_offset", "layernorm_formula",
        "rmsnorm_offset", "batchnorm_stats", "batchnorm_running", "sum_long", "grad_magnitude_sweep",
        "realistic_grad_distribution", "deep_narrow_vanishing", "loss_past_fp16_max", "scaled_grad_overflow",
        "activation_overflow", "attention_logit_growth", "grad_spike")


@pytest.fixture(scope="module")
def quick_records(reg, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The quick tier of these scenarios under all 13 presets on the CPU, as the default run makes it."""
    out = tmp_path_factory.mktemp("suites") / "run"
    run_matrix(RunConfig([reg.get(n) for n in MINE], list(PRESETS.values()), CPU, tier="quick", out=out))
    return read_run(out)[1]


def test_quick_tier_outcomes_are_the_declared_ones(quick_records: list[dict]) -> None:
    assert len(quick_records) == len(PRESETS) * 34
    wrong = [f"{r['case']} {r['strategy']}: {r['outcome']} ({r['reason']}), declared "
             f"{(r['expected'] or {}).get('outcome', 'pass')}"
             for r in quick_records if r["outcome"] != declared_outcome(r)]
    assert not wrong, "\n".join(wrong)
    assert {r["outcome"] for r in quick_records if r["strategy"] == "fp32"} == {"pass"}
    collapsed = [r for r in quick_records if r["outcome"] == "scale_exhausted"]
    assert {r["strategy"] for r in collapsed} == {"fp16-dynamic", "fp16-gradscaler", "fp16-pure", "fp16-master"}
    assert all("collapsed" in r["reason"] for r in collapsed)


def test_family_counts_and_every_description_names_a_mechanism(reg) -> None:
    fams = {f: [s for s in MINE if reg.get(s).family == f] for f in ("reduction", "tiny_gradient", "exploding_loss")}
    assert (len(fams["reduction"]), len(fams["tiny_gradient"]), len(fams["exploding_loss"])) == (9, 3, 5)
    for name in MINE:
        s = reg.get(name)
        assert len(s.description) > 300 and s.quick and set(s.quick) <= set(s.grid)
        assert all(e.reason for e in s.expect)
