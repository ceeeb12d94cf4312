"""The mechanisms the FP8-recipe scenarios (suites/fp8_recipes.py) claim, proved on their own inputs with the
recipes' quantization computed directly (one scale per tensor, per feature, per token; the amax history),
then on the records the engine writes; and the quick tier's outcomes are the declared ones for every preset."""
from __future__ import annotations

import pytest
import torch

from harness.values.fp8 import AmaxHistory, E4M3, E5M2, quantize_fp8
from harness.core.scenario import Case, discover, seed_generator
from harness.core.strategy import PRESETS, parse
from harness.results import read_run
from harness.run.engine import RunConfig, run_case, run_matrix
from harness.run.reference import ReferenceCache
from suites import fp8_recipes as fr

CPU = torch.device("cpu")
NAMES = ("fp8_activation_outliers", "fp8_amax_spike", "fp8_amax_stale", "fp8_grad_underflow")


@pytest.fixture(scope="module")
def reg():
    return discover()


def inputs(reg, name: str, **params) -> dict:
    s = reg.get(name)
    return s.inputs(params, seed_generator(Case(s, params, 0)))


def record(reg, name: str, strategy: str, **params) -> dict:
    s = reg.get(name)
    case = Case(s, params, 0)
    rec, _ = run_case(case, parse(strategy), CPU, s.inputs(params, seed_generator(case)), ReferenceCache())
    assert rec["outcome"] != "error", rec.get("traceback")
    return rec


def q(x: torch.Tensor, fmt, amax: torch.Tensor) -> torch.Tensor:
    """``x`` scaled to ``fmt.max / amax`` (broadcast: per tensor, row or column), cast, and scaled back."""
    scale = fmt.max / amax
    return quantize_fp8(x, fmt, scale).float() / scale


def per_tensor(x: torch.Tensor, fmt) -> torch.Tensor:
    return q(x, fmt, x.abs().max())


def per_column(x: torch.Tensor, fmt) -> torch.Tensor:
    return q(x, fmt, x.abs().amax(0, keepdim=True))


# -- activation outliers ---------------------------------------------------------------------------------
def _regular(x: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(x.shape[1], dtype=torch.bool)
    keep[list(fr.OUTLIERS)] = False
    return x[:, keep]


def test_one_scale_per_tensor_flushes_exactly_the_channels_below_2_to_ratio_minus_18_8(reg) -> None:
    x = inputs(reg, "fp8_activation_outliers", log2_ratio=13)["x"].bfloat16().float()  # as ex.act hands it over
    amax = float(x.abs().max())
    assert 2.0**12 <= amax < 2.0**13 and amax == float(x[:, list(fr.OUTLIERS)].abs().max())  # the outliers set it
    xq = per_tensor(x, E4M3)
    flushed = (_regular(xq) == 0).all(0)
    # half of E4M3's smallest subnormal 2^-9, in x's units: amax * 2^-10 / 448; a channel all below it flushes
    limit = amax * 2.0**-10 / 448
    assert torch.equal(flushed, (_regular(x).abs() < limit).all(0))
    assert 0.2 < float(flushed.float().mean()) < 0.4  # channels log-uniform in [2^-8, 1): those below 2^-5.8
    assert not (_regular(per_column(x, E4M3)) == 0).all(0).any()  # a scale per channel keeps every one
    rec = record(reg, "fp8_activation_outliers", "fp8-tensorwise", log2_ratio=13)
    assert rec["outcome"] == "underflow"
    assert rec["metrics"]["regular_channels_zero_grad"] == int(flushed.sum())
    # dw's zero rows are the flushed channels; a few more entries of channels that kept a token or two (on
    # E4M3's coarse subnormal grid) cancel to exactly 0
    share = int(flushed.sum()) / fr.CHANNELS
    assert share <= rec["metrics"]["grad_underflow_frac"] < share + 0.005


def test_outliers_of_1000x_lose_no_channel_under_one_scale(reg) -> None:
    x = inputs(reg, "fp8_activation_outliers", log2_ratio=10)["x"].bfloat16().float()
    assert not (_regular(per_tensor(x, E4M3)) == 0).all(0).any()
    assert record(reg, "fp8_activation_outliers", "fp8-tensorwise", log2_ratio=10)["outcome"] == "pass"


# -- the amax history --------------------------------------------------------------------------------------
def test_delayed_scaling_saturates_the_spike_at_448(reg) -> None:
    x = inputs(reg, "fp8_amax_spike", log2_spike=8)["x"]
    h = AmaxHistory()
    for i in range(fr.CALM):
        h.scale("a", x[i].abs().max(), E4M3.max, delayed=True)
    spike = x[fr.CALM] * 2.0**8
    scale = h.scale("a", spike.abs().max(), E4M3.max, delayed=True)
    calm_amax = float(x[: fr.CALM].abs().max())
    assert float(scale) == pytest.approx(E4M3.max / calm_amax)  # the history's, not the spike's
    xq = quantize_fp8(spike, E4M3, scale).float()
    assert float((xq.abs() == E4M3.max).float().mean()) == 1.0  # |x| >= 128 > 448 / (448 / calm_amax): all saturate
    delayed = record(reg, "fp8_amax_spike", "fp8-delayed", log2_spike=8)
    current = record(reg, "fp8_amax_spike", "fp8-tensorwise", log2_spike=8)
    assert (delayed["outcome"], current["outcome"]) == ("diverged", "pass")
    assert delayed["metrics"]["rel_err"] > 0.99 and current["metrics"]["rel_err"] < 0.05


def test_delayed_scaling_flushes_calm_steps_under_an_obsolete_amax(reg) -> None:
    x = inputs(reg, "fp8_amax_stale", log2_drop=20)["x"]
    h = AmaxHistory()
    h.scale("a", (x[0] * 2.0**20).abs().max(), E4M3.max, delayed=True)
    scale = h.scale("a", x[1].abs().max(), E4M3.max, delayed=True)
    assert float(scale) == pytest.approx(E4M3.max / float((x[0] * 2.0**20).abs().max()))
    assert float(x[1].abs().max() * scale) < 2.0**-10  # under half the smallest subnormal: every value rounds to 0
    assert int(quantize_fp8(x[1], E4M3, scale).float().count_nonzero()) == 0
    rec = record(reg, "fp8_amax_stale", "fp8-delayed", log2_drop=20)
    assert rec["outcome"] == "underflow" and rec["metrics"]["grad_underflow_frac"] == 1.0
    assert record(reg, "fp8_amax_stale", "fp8-tensorwise", log2_drop=20)["outcome"] == "pass"
    assert record(reg, "fp8_amax_stale", "fp8-delayed", log2_drop=10)["outcome"] == "pass"


# -- E5M2 gradients ------------------------------------------------------------------------------------------
def per_block(x: torch.Tensor, fmt, rows: int) -> torch.Tensor:
    """A scale per feature (column) and block of ``rows`` tokens."""
    t, f = x.shape
    xb = x.reshape(t // rows, rows, f)
    return q(xb, fmt, xb.abs().amax(1, keepdim=True)).reshape(t, f)


def test_one_e5m2_scale_flushes_the_small_features_and_one_per_feature_keeps_them(reg) -> None:
    g = inputs(reg, "fp8_grad_underflow", layout="features")["t"].bfloat16().float()  # dL/dy reaches the GEMM in BF16
    lost = per_tensor(g, E5M2) == 0
    assert torch.equal(lost, g.abs() * (E5M2.max / g.abs().max()) < 2.0**-17)  # half of E5M2's 2^-16
    assert 0.4 < float(lost.float().mean()) < 0.6
    assert int((per_column(g, E4M3) == 0).sum()) == 0  # each feature scaled to its own amax (E4M3 even)
    rec = record(reg, "fp8_grad_underflow", "fp8-tensorwise", layout="features")
    assert rec["outcome"] == "underflow"
    assert rec["metrics"]["grad_underflow_frac"] == float(lost.float().mean())  # dw = I^T G: entry for entry


@pytest.mark.parametrize("layout", ["tokens", "tokens_other_tile", "tokens_other_block"])
def test_large_tokens_fit_e5m2_per_tensor_and_flush_the_e4m3_scales_they_share(reg, layout: str) -> None:
    g = inputs(reg, "fp8_grad_underflow", layout=layout)["t"].bfloat16().float()
    judged = fr.judged_tokens(layout)
    judged[list(fr.LARGE)] = False
    assert int((per_tensor(g, E5M2) == 0).sum()) == 0
    lost = {"column": per_column(g, E4M3) == 0, "tile": per_block(g, E4M3, 128) == 0,
            "block": per_block(g, E4M3, 32) == 0}
    share = {k: float(v[judged].double().mean()) for k, v in lost.items()}
    assert share["column"] == 1.0  # the row-wise recipes: every judged token's gradient flushes
    assert share["tile"] == {"tokens": 126 / 254, "tokens_other_tile": 0.0, "tokens_other_block": 1.0}[layout]
    assert share["block"] == {"tokens": 30 / 254, "tokens_other_tile": 0.0, "tokens_other_block": 0.0}[layout]
    rec = record(reg, "fp8_grad_underflow", "fp8-tensorwise", layout=layout)
    assert rec["outcome"] == "pass"


def test_e2m1_blocks_of_32_flush_the_small_end_of_a_2_to_8_spread(reg) -> None:
    g = inputs(reg, "fp8_grad_underflow", layout="spread")["t"].bfloat16().float()
    assert int((per_column(g, E4M3) == 0).sum()) == 0 and int((per_tensor(g, E5M2) == 0).sum()) == 0
    blocks = g.reshape(-1, 32, g.shape[1])  # MX: blocks of 32 along the tokens (the weight gradient's K)
    # E8M0: 2^(floor(log2 amax) - 2), E2M1's emax being 2 (frexp: exact, where log2 of an FP32 may round up)
    scale = torch.exp2((torch.frexp(blocks.abs().amax(1, keepdim=True)).exponent - 3).float())
    # at or under half of E2M1's smallest subnormal 0.5: a tie (BF16 gradients hit 0.25 exactly) rounds to even, 0
    lost = float((blocks.abs() / scale <= 0.25).double().mean())
    rec = record(reg, "fp8_grad_underflow", "mxfp4", layout="spread")
    assert rec["outcome"] == "underflow" and rec["metrics"]["grad_underflow_frac"] == pytest.approx(lost, abs=1e-9)
    assert record(reg, "fp8_grad_underflow", "fp8-rowwise", layout="spread")["outcome"] == "pass"


# -- declared against actual ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_records(reg, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("fp8") / "run"
    run_matrix(RunConfig([reg.get(n) for n in NAMES], list(PRESETS.values()), CPU, tier="quick", out=out))
    return read_run(out)[1]


def test_quick_tier_outcomes_are_the_declared_ones(quick_records: list[dict]) -> None:
    assert quick_records and {r["scenario"] for r in quick_records} == set(NAMES)
    wrong = [f"{r['case']} {r['strategy']}: got {r['outcome']} ({r['reason']}), declared "
             f"{(r['expected'] or {}).get('outcome', 'pass')}" for r in quick_records
             if r["outcome"] != "unsupported" and r["outcome"] != (r["expected"] or {}).get("outcome", "pass")]
    assert not wrong, "\n".join(wrong)


def test_the_scenarios_separate_delayed_from_tensorwise(quick_records: list[dict]) -> None:
    by = {(r["case"], r["strategy"]): r["outcome"] for r in quick_records}
    cases = {c for c, _ in by}
    differ = sorted(c for c in cases if by[(c, "fp8-tensorwise")] != by[(c, "fp8-delayed")])
    assert differ == ["fp8_amax_spike[log2_spike=8]", "fp8_amax_stale[log2_drop=20]"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_full_grid_outcomes_are_the_declared_ones_and_separate_the_recipes(reg, tmp_path) -> None:
    from harness.core.strategy import tier_presets
    from harness.report.separation import separation_tables
    out = tmp_path / "run"
    strategies = [parse(n) for n in tier_presets("recipes")]
    run_matrix(RunConfig([reg.get(n) for n in NAMES], strategies, torch.device("cuda"), tier="full", out=out))
    recs = read_run(out)[1]
    wrong = [f"{r['case']} {r['strategy']}: got {r['outcome']} ({r['reason']}), declared "
             f"{(r['expected'] or {}).get('outcome', 'pass')}" for r in recs
             if r["outcome"] != "unsupported" and r["outcome"] != (r["expected"] or {}).get("outcome", "pass")]
    assert not wrong, "\n".join(wrong)
    _, summary = separation_tables(recs)
    unseparated = [r for r in summary.rows if r[2] == "no scenario separates them"]
    assert not unseparated, unseparated  # these four scenarios alone separate every pair of recipes
