"""The Tensor-Core probes (harness.device.tc_probes) recover every parameter of the CPU model exactly, for many settings.

The model (harness.device.tensor_core_model) stands in for a GPU: the probes see only ``matmul(a, b, c)``, so
recovering its parameters exactly is what makes their verdicts on a real device trustworthy.
"""
from __future__ import annotations

import json

import pytest
import torch

from harness.device import device_profile as dp
from harness.device import tc_probes as tp
from harness.values.formats import get_format
from harness.device.tensor_core_model import ROUNDINGS, TensorCoreModel, round_integer, round_significand

# (format, model parameters): the settings the probes must recover, far apart on every axis
SETTINGS = [
    ("fp16", dict(block=4, alignment_bits=24)),  # no extra bits, truncation everywhere
    ("fp16", dict(block=16, alignment_bits=26, alignment_reference="exponent_sum")),
    ("bf16", dict(block=8, alignment_bits=27, alignment_rounding="nearest_even",
                  normalization_rounding="nearest_even")),
    ("bf16", dict(block=32, alignment_bits=25, alignment_rounding="up", normalization_rounding="down",
                  fused_c=False)),
    ("tf32", dict(block=8, alignment_bits=26, subnormals=False, input_rounding="toward_zero",
                  normalization_rounding="nearest_away")),
    ("tf32", dict(block=4, alignment_bits=30, alignment_rounding="down", input_rounding="nearest_away")),
    ("fp8_e4m3", dict(block=32, alignment_bits=14, accumulator_bits=14, alignment_reference="exponent_sum")),
    ("fp8_e4m3", dict(block=16, alignment_bits=13, alignment_rounding="nearest_away")),  # FP32 normalizes
    ("fp16", dict(block=8, alignment_bits=24, exact_products=False)),
    ("bf16", dict(block=16, alignment_bits=22, accumulator_bits=20)),  # narrower than FP32
]


def expected(fmt: str, m: TensorCoreModel) -> dict:
    """What the probes must report for model ``m``: its parameters, restated in profile terms."""
    acc = min(m.alignment_bits, m.accumulator_bits)
    return {
        "block_size": m.block, "alignment_bits": m.alignment_bits, "accumulator_bits": acc,
        "extra_bits": m.alignment_bits - acc, "output_fp32": acc == 24,
        "alignment_rounding": m.alignment_rounding, "alignment_reference": m.alignment_reference,
        # a window narrower than the accumulator: the carry bits a sum keeps are dropped when the next
        # step aligns it, so the alignment's rounding is what a longer sum shows
        "normalization_rounding": (m.normalization_rounding if m.alignment_bits >= m.accumulator_bits
                                   else m.alignment_rounding),
        "products_exact": m.exact_products, "subnormals": "honoured" if m.subnormals else "flushed",
        "input_rounding": m.input_rounding if fmt == "tf32" else None, "c_fused": m.fused_c,
    }


@pytest.mark.parametrize("fmt,params", SETTINGS, ids=[f"{f}-" + "-".join(f"{k}={v}" for k, v in p.items())
                                                      for f, p in SETTINGS])
def test_probes_recover_the_model(fmt: str, params: dict) -> None:
    model = TensorCoreModel(fmt, **params)
    prof = tp.profile_format(model, fmt, "model", validate=False)
    got = {k: prof[k] for k in expected(fmt, model)}
    assert got == expected(fmt, model), prof["notes"]
    assert [n.split(":")[0] for n in prof["notes"]] == ([] if model.exact_products else ["inexact products"])


def test_a_profile_holds_findings_only_so_two_measurements_are_equal() -> None:
    # records of tc_profile must not differ between processes (sharded ranks) measuring the same device
    model = TensorCoreModel("bf16", block=8, alignment_bits=3)
    a, b = (tp.profile_format(model, "bf16", "model", validate=False) for _ in range(2))
    assert a == b and "seconds" not in a and a["block_size"] == 8


def test_profile_rebuilds_the_model_and_agrees_bit_for_bit() -> None:
    model = TensorCoreModel("fp8_e4m3", block=32, alignment_bits=14, accumulator_bits=14,
                            alignment_reference="exponent_sum")
    prof = tp.profile_format(model, "fp8_e4m3", "model", validate=True)
    assert tp.model_from_profile("fp8_e4m3", prof) == model
    assert prof["model_agreement"] == 1.0


@pytest.mark.parametrize("other", [dict(block=8), dict(alignment_bits=25), dict(alignment_reference="product"),
                                   dict(normalization_rounding="nearest_even")])
def test_agreement_exposes_a_wrong_model(other: dict) -> None:
    """A profile that misdescribes the device by one parameter reproduces visibly fewer results."""
    base = dict(block=16, alignment_bits=26, alignment_reference="exponent_sum")
    device = TensorCoreModel("fp16", **base)
    prof = tp.profile_format(device, "fp16", "model", validate=False)
    wrong = dict(prof, **{{"block": "block_size"}.get(k, k): v for k, v in other.items()})
    assert tp.model_agreement(device, "fp16", prof, calls=1) == 1.0
    assert tp.model_agreement(device, "fp16", wrong, calls=1) < 0.99


def test_block_probe_reports_a_block_wider_than_k() -> None:
    prof = tp.probe_block(TensorCoreModel("fp16", block=64), get_format("fp16"), k=32)
    assert prof["block_size"] is None and "block is >= 32" in prof["notes"][0]


def test_block_of_two_leaves_one_step_probes_open() -> None:
    prof = tp.profile_format(TensorCoreModel("bf16", block=2), "bf16", "model", validate=False)
    assert prof["block_size"] == 2
    assert prof["alignment_bits"] is None and prof["model_agreement"] is None
    assert any("block 2 < 3" in n for n in prof["notes"])


# -- pieces ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,pred", [
    ("nearest_even", [0, 0, 1, 0, 0, -1]), ("nearest_away", [0, 1, 1, 0, -1, -1]),
    ("toward_zero", [0, 0, 0, 0, 0, 0]), ("up", [1, 1, 1, 0, 0, 0]), ("down", [0, 0, 0, -1, -1, -1])])
def test_rounding_modes_on_fractions_of_a_unit(mode: str, pred: list[int]) -> None:
    fr = torch.tensor(tp.FRACTIONS, dtype=torch.float64)
    assert round_integer(fr, mode).tolist() == pred
    assert tp.classify_rounding(tp.FRACTIONS, pred) == mode


def test_classify_rounding_exact_and_unknown() -> None:
    assert tp.classify_rounding(tp.CARRY_FRACTIONS, list(tp.CARRY_FRACTIONS)) == "exact"
    assert tp.classify_rounding(tp.FRACTIONS, [1, 0, 0, 0, 0, 0]) is None
    assert set(ROUNDINGS) == {"nearest_even", "nearest_away", "toward_zero", "up", "down"}


def test_round_significand() -> None:
    x = torch.tensor([1 + 2.0 ** -11, -(1 + 3 * 2.0 ** -12), 1 + 2.0 ** -10 + 2.0 ** -11], dtype=torch.float64)
    assert round_significand(x, 11, "nearest_even").tolist() == [1.0, -(1 + 2.0 ** -10), 1 + 2.0 ** -9]
    assert round_significand(x, 11, "toward_zero").tolist() == [1.0, -1.0, 1 + 2.0 ** -10]


@pytest.mark.parametrize("fmt", tp.PROBED_FORMATS)
def test_factors_are_exact_and_in_range(fmt: str) -> None:
    f = get_format(fmt)
    lo, hi = tp.product_range(f)
    for v in (2.0 ** lo, -(2.0 ** hi), 1.5 * 2.0 ** (lo + 1), 0.75):
        x, y = tp.factors(f, v)
        assert x * y == v
        for z in (x, y):
            assert f.min_normal <= abs(z) <= f.max and round_significand(
                torch.tensor([z], dtype=torch.float64), f.precision, "nearest_even").item() == z
    with pytest.raises(ValueError, match="not a product"):
        tp.factors(f, 2.0 ** (2 * f.emax + 1))


def test_run_dots_batches_match_single_calls() -> None:
    model = TensorCoreModel("fp16", block=8, alignment_bits=25)
    dots = [tp.Dot({0: (2.0 ** 10, 2.0 ** 10), j % 64: (1.0, 2.0 ** -14)}, c=float(j)) for j in range(1, 150)]
    batched = tp.run_dots(model, dots, 64)
    single = [tp.run_dots(model, [d], 64)[0] for d in dots[::37]]
    assert batched[::37] == single
    assert batched[0] == 1.0 + 2.0 ** 20  # c=1, big 2^20, 2^-14 lost below 2^(20-24)


def test_model_block_one_is_a_chain_of_fma() -> None:
    """block 1, a window wide enough for both terms and RN normalization: each step is an FP32 FMA."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 32, generator=g).half().float(), torch.randn(32, 4, generator=g).half().float()
    model = TensorCoreModel("fp16", block=1, alignment_bits=48, alignment_rounding="nearest_even",
                            normalization_rounding="nearest_even")
    acc = torch.zeros(4, 4, dtype=torch.float64)
    for k in range(32):  # product exact in float64, one rounding to FP32 per step
        acc = (acc + a[:, k:k + 1].double() * b[k:k + 1, :].double()).float().double()
    assert torch.equal(model(a, b, torch.zeros(4, 4)), acc.float())


def test_model_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="alignment_rounding"):
        TensorCoreModel("fp16", alignment_rounding="stochastic")
    with pytest.raises(ValueError, match="at most 24"):
        TensorCoreModel("fp16", accumulator_bits=30)
    with pytest.raises(ValueError, match="unknown format"):
        TensorCoreModel("fp12")


# -- command line and device entry points -------------------------------------------------------------------
def test_cli_profiles_the_model_and_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "p.json"
    rc = dp.main(["--model", "block=8,alignment_bits=25,alignment_rounding=nearest_even", "--format", "bf16",
                  "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    prof = data["formats"]["bf16"]
    assert (prof["block_size"], prof["alignment_bits"], prof["extra_bits"]) == (8, 25, 1)
    assert prof["alignment_rounding"] == "nearest_even" and prof["model_agreement"] == 1.0
    text = capsys.readouterr().out
    assert "block_size              8" in text and "extra_bits              1" in text


@pytest.mark.parametrize("argv,msg", [(["--model", "blocks=8"], "unknown parameter 'blocks'"),
                                      (["--model", "block=8", "--format", "fp12"], "unknown format 'fp12'"),
                                      (["--model", "alignment_rounding=sideways"], "alignment_rounding")])
def test_cli_bad_input_exits_2(argv: list[str], msg: str, capsys) -> None:
    assert dp.main(argv) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_device_profile_needs_cuda(capsys) -> None:
    with pytest.raises(ValueError, match="need a CUDA device"):
        dp.device_profile("cuda")
    assert dp.main(["--format", "fp16"]) == 2
    assert "--model" in capsys.readouterr().err


def test_render_table_marks_open_and_unsupported_entries() -> None:
    res = {"backend": "model", "device": {}, "formats": {
        "fp16": dict({f: None for f in tp.FIELDS}, block_size=16, notes=["why"]),
        "fp8_e4m3": {"format": "fp8_e4m3", "unsupported": "sm_80 has no fp8"}}, "seconds": 0.5}
    text = dp.render_table(res)
    assert "block_size              16" in text and "alignment_bits          ?" in text
    assert "fp8_e4m3: unsupported: sm_80 has no fp8" in text and "fp16: why" in text
    assert text.endswith("seconds: 0.5")


# -- the tensor_core suite on the CPU ------------------------------------------------------------------------------
def test_tensor_core_scenarios_are_cuda_only_and_unsupported_here() -> None:
    from harness.run.engine import run_case
    from harness.run.reference import ReferenceCache
    from harness.core.scenario import Case, discover
    from harness.core.strategy import PRESETS
    scen = discover().select(families=["tensor_core"])
    assert {s.name for s in scen} >= {"tc_profile", "tc_long_dot"}
    for s in scen:
        assert s.devices == ("cuda",)
        rec, _ = run_case(Case(s, s.params("quick")[0], 0), PRESETS["fp16"], torch.device("cpu"), {}, ReferenceCache())
        assert rec["outcome"] == "unsupported" and "cuda only" in rec["reason"]


@pytest.mark.parametrize("strategy,bound", [("fp32", 0.0), ("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8)])
def test_long_dot_inputs_are_exact_so_only_the_output_rounds(strategy: str, bound: float) -> None:
    """Run on the CPU (where FP32 sums these short positive products exactly): the only error is the
    output's rounding to the activation format, at most u; exact for FP32."""
    from harness.core.execution import Execution
    from harness.core.strategy import PRESETS
    from suites import tensor_core as tc
    p = {"k": 256, "gemm": "library"}
    inp = tc._dot_inputs(p, torch.Generator().manual_seed(0))
    for x in inp.values():
        assert torch.equal(x.to(torch.float8_e4m3fn).float(), x) and bool((x > 0).all())  # exact in E4M3
    out = tc._dot_run(Execution(PRESETS[strategy], "cpu"), inp, p)
    exact = inp["a"].double() @ inp["b"].double()
    err = ((out.value.double() - exact).abs() / exact).max().item()
    assert err <= bound and (strategy == "fp32" or err > 0)


def test_long_dot_tensor_core_path_of_the_reference_is_a_plain_gemm() -> None:
    """FP32 and FP64 executions (the reference and its check) never reach the Tensor-Core kernel."""
    from harness.core.execution import FP64, Execution
    from harness.core.strategy import PRESETS
    from suites import tensor_core as tc
    p = {"k": 128, "gemm": "tensor_core"}
    inp = tc._dot_inputs(p, torch.Generator().manual_seed(1))
    y64 = tc._dot_run(FP64("cpu"), inp, p).value
    y32 = tc._dot_run(Execution(PRESETS["fp32"], "cpu"), inp, p).value
    assert y64.dtype == torch.float64 and torch.equal(y64, inp["a"].double() @ inp["b"].double())
    assert torch.equal(y32.double(), y64)
