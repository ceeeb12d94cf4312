"""The expected-outcome table: the committed docs/expected.md is the generated text, and what the
weight_update, accumulation and loss-scaling scenarios declare is what they do on the CPU (quick tier,
every strategy preset)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import declared_outcome
from harness.run.engine import RunConfig, run_matrix
from harness.expectations import CODES, expected_outcome, main, render
from harness.results import read_run
from harness.core.scenario import Expect, Output, Scenario, discover
from harness.core.strategy import PRESETS, parse

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
MINE = ("update_swamping", "adam_eps_underflow", "inner_product_accumulation", "grad_accumulation_buffer",
        "scaler_cap_underflow", "scaler_floor_overflow", "scaler_collapse_burst", "scale_window_empty")


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The quick tier of these scenarios under all 13 presets, as the default run makes it."""
    reg = discover()
    out = tmp_path_factory.mktemp("expected") / "run"
    run_matrix(RunConfig([reg.get(n) for n in MINE], list(PRESETS.values()), CPU, tier="quick", out=out))
    return read_run(out)[1]


def test_committed_table_is_the_generated_one(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 0
    generated = capsys.readouterr().out
    committed = (ROOT / "docs" / "expected.md").read_text()
    assert committed == generated, "docs/expected.md is stale: python -m harness.expectations > docs/expected.md"
    assert main(["--check", str(ROOT / "docs" / "expected.md")]) == 0


def test_declared_expectations_match_actual_cpu_outcomes(records: list[dict]) -> None:
    assert len(records) == len(PRESETS) * 17  # 17 quick cases
    wrong = [f"{r['case']} {r['strategy']}: got {r['outcome']} ({r['reason']}), declared "
             f"{(r['expected'] or {}).get('outcome', 'pass')}"
             for r in records if r["outcome"] != declared_outcome(r)]
    assert not wrong, "\n".join(wrong)
    reg = discover()
    for r in records:  # the table and the records read the same declarations
        if declared_outcome(r) != r["outcome"] or r["reason"].startswith("not applicable:"):
            continue
        assert expected_outcome(reg.get(r["scenario"]), r["params"], PRESETS[r["strategy"]])[0] == r["outcome"]


def test_fp32_passes_every_case(records: list[dict]) -> None:
    assert {r["outcome"] for r in records if r["strategy"] == "fp32"} == {"pass"}


def test_fp16_pure_fails_weight_update_cases_that_fp16_master_passes(records: list[dict]) -> None:
    by = {(r["case"], r["strategy"]): r for r in records if r["family"] == "weight_update"}
    cases = sorted({c for c, _ in by})
    assert len(cases) == 4
    for c in cases:
        assert by[(c, "fp16-pure")]["outcome"] in ("diverged", "overflow")
        assert by[(c, "fp16-master")]["outcome"] == "pass"
    swamped = by[("update_swamping[log2_ratio=-12]", "fp16-pure")]
    assert swamped["metrics"]["swamped_frac"] > 0.99 and swamped["metrics"]["rel_err"] > 0.99
    adam = by[("adam_eps_underflow[log2_grad=-12]", "fp16-pure")]["metrics"]
    assert (adam["v_zero_frac"], adam["eps_in_state_dtype"], adam["state_dtype"]) == (1.0, 0.0, "float16")
    assert by[("adam_eps_underflow[log2_grad=-12]", "fp16-master")]["metrics"]["state_dtype"] == "float32"


def test_default_run_has_scale_exhausted_and_stalled_with_evidence(records: list[dict]) -> None:
    exhausted = [r for r in records if r["outcome"] == "scale_exhausted"]
    stalled = [r for r in records if r["outcome"] == "stalled"]
    assert {r["metrics"]["scale_direction"] for r in exhausted} == {"max", "min"}
    assert all(r["reason"].startswith(r["metrics"]["scale_direction"] + ":") for r in exhausted)
    assert any("cap scale 2^24" in r["reason"] for r in exhausted)
    assert any(r["strategy"] == "fp16-gradscaler" and "collapsed" in r["reason"] for r in exhausted)
    assert stalled and all(r["reason"].startswith("skip_rate ") and r["metrics"]["scaler"]["skip_rate"] > 0.5
                           for r in stalled)
    for r in exhausted + stalled:  # the record carries the scale trajectory and the reference window
        sc = r["metrics"]["scaler"]
        assert sc["trajectory"] and None not in (sc["scale_min"], sc["scale_max"], sc["scale_final"])
        assert r["window"]["describe"]


def test_accumulation_records_error_against_k_next_to_the_bound(records: list[dict]) -> None:
    r = next(r for r in records if r["case"] == "inner_product_accumulation[K=16384,data=same_sign,"
             "accumulator=compute]" and r["strategy"] == "bf16")
    m = r["metrics"]
    assert list(m["err_vs_K"]) == list(m["bound_vs_K"]) == ["256", "1024", "4096", "16384"]
    # the K-point is the verdict's own: against FP64 instead of the FP32 reference, the same to 4 digits
    assert m["err_vs_K"]["16384"] == pytest.approx(m["rel_err"], rel=1e-4) and m["bound_vs_K"]["16384"] == r["bound"]
    errs = list(m["err_vs_K"].values())
    assert errs == sorted(errs) and errs[-1] > 4 * errs[0]  # same-sign data in a BF16 total: grows with K
    g = next(r for r in records
             if r["case"] == "grad_accumulation_buffer[micro=4096]" and r["strategy"] == "bf16-master")
    assert g["metrics"]["buffer_dtype"] == "bfloat16" and g["outcome"] == "diverged"


def _toy(ex, inp: dict, p: dict) -> Output:
    return Output(value=ex.act(inp["x"]).float())


def test_render_marks_declared_unsupported_and_passing_cells() -> None:
    s = Scenario(name="toy", family="accumulation", description="A toy.\nSecond line.", grid={"k": [1, 2]},
                 inputs=lambda p, g: {"x": torch.ones(2)}, run=_toy,
                 expect=(Expect(("fp16*",), "overflow", "k=2 overflows", when=lambda p: p["k"] == 2),))
    reduced = parse("compute=fp16,reduction=reduced")
    text = render([s], [PRESETS["fp32"], PRESETS["fp16"], reduced], tier="full")
    assert "| `toy[k=1]` | · | · | n/a |" in text and "| `toy[k=2]` | · | ovf | n/a |" in text
    assert "| accumulation | 0/2 | 1/2 | n/a |" in text
    assert "- **toy**: A toy." in text and "  - fp16: `overflow`, k=2 overflows" in text
    assert CODES["scale_exhausted"] == "exh" and "## reduction" not in text


def test_check_and_bad_input_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    stale = tmp_path / "expected.md"
    stale.write_text("# old\n")
    assert main(["--check", str(stale)]) == 1
    assert "is stale: regenerate it with python -m harness.expectations >" in capsys.readouterr().err
    assert main(["--check", str(tmp_path / "missing.md")]) == 2
    assert main(["--tier", "huge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].startswith("error: ") and "invalid choice: 'huge'" in err[1]


def test_render_splits_the_columns_by_strategy_group() -> None:
    s = Scenario(name="toy", family="accumulation", description="A toy.", grid={"k": [1]},
                 inputs=lambda p, g: {"x": torch.ones(2)}, run=_toy,
                 expect=(Expect(("fp8-*",), "underflow", "flushed"),))
    text = render([s], [PRESETS["fp32"], PRESETS["bf16"], PRESETS["fp8-tensorwise"], PRESETS["fp16"]], tier="full")
    for title, head, row in (("FP32, TF32 and FP16", "| case | fp32 | fp16 |", "| `toy[k=1]` | · | · |"),
                             ("BF16", "| case | bf16 |", "| `toy[k=1]` | · |"),
                             ("FP8 and FP4 recipes", "| case | fp8-tensorwise |", "| `toy[k=1]` | unf |")):
        assert f"*{title}*\n\n{head}" in text and row in text
    assert "| family | fp8-tensorwise |\n|---|---:|\n| accumulation | 1/1 |" in text
