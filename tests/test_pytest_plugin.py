"""The pytest plugin, black-box with pytester: off by default, cases as items with xfail/xpass, junitxml,
filters, bad input, and assert_robust / the harness_check fixture."""
from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

import harness.run.engine  # noqa: F401  (imported here so the in-process pytester runs reuse it, never re-import torch)
from harness.pytest_plugin import assert_robust
from harness.core.scenario import REGISTRY, discover

pytest_plugins = ["pytester"]
discover()

SCENARIO = "plugtest_flush"
# 64 copies of 2^log2: 2^-30 flushes to zero in FP16 (declared for fp16*), 2^17 overflows FP16 (declared
# for fp16 as diverged: the wrong kind), BF16 keeps both (declared underflow at 2^-30: wrong, an XPASS).
USER_MODULE = f'''
import torch
from harness.core.scenario import Expect, Output, Scenario, register

def _run(ex, inp, p):
    return Output(value=ex.act(inp["x"]).float())

register(Scenario(
    name="{SCENARIO}", family="tiny_gradient", description="values past FP16's range",
    grid={{"log2": [-30, -10, 17]}},
    inputs=lambda p, g: {{"x": torch.full((64,), 2.0 ** p["log2"])}},
    run=_run,
    expect=(Expect(("fp16*",), "underflow", "2^-30 is below 2^-24", when=lambda p: p["log2"] == -30),
            Expect(("fp16",), "diverged", "declared the wrong kind", when=lambda p: p["log2"] == 17),
            Expect(("bf16",), "underflow", "wrongly declared", when=lambda p: p["log2"] == -30)),
))
'''
# inner runs leave out plugins that only cost time here (hypothesis re-imports itself on every in-process run)
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")
ARGS = ("--harness", "--harness-import", "plugtest_user", "--harness-scenario", SCENARIO, "--harness-device", "cpu",
        "--harness-strategy", "fp16", "--harness-strategy", "fp16-static", "--harness-strategy", "bf16", *QUIET)


@pytest.fixture
def run_user(pytester):
    """runpytest with the user module that registers SCENARIO; the registry outlives each in-process
    run while the module is imported afresh, so the scenario is removed after every run."""
    pytester.makepyfile(plugtest_user=USER_MODULE)
    pytester.syspathinsert()

    def run(*args: str):
        try:
            return pytester.runpytest(*ARGS, *args)
        finally:
            REGISTRY.remove(SCENARIO)
    return run


def test_off_by_default(pytester):
    pytester.makepyfile("def test_one():\n    assert 1 + 1 == 2\n")
    res = pytester.runpytest(*QUIET)
    res.assert_outcomes(passed=1)
    assert "harness::" not in res.stdout.str() and "references computed" not in res.stdout.str()
    helped = pytester.runpytest("--help", *QUIET)
    assert "--harness-scenario=GLOB" in helped.stdout.str()


def test_the_plugin_module_imports_no_torch():
    code = "import sys, harness.pytest_plugin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cases_become_items_with_xfail_and_xpass(run_user):
    res = run_user("-rxXf", "--collect-only", "-q")
    names = [line for line in res.stdout.lines if line.startswith("harness::")]
    assert names[:3] == [f"harness::{SCENARIO}[log2=-30]-fp16-cpu", f"harness::{SCENARIO}[log2=-30]-fp16-static-cpu",
                         f"harness::{SCENARIO}[log2=-30]-bf16-cpu"]
    assert len(names) == 9
    res = run_user("-rxXf")
    # fp16 and fp16-static at 2^-10, bf16 at 2^-10 and 2^17 pass; 2^-30 in fp16* is the declared xfail;
    # bf16 at 2^-30 passes against its declaration (XPASS); 2^17 overflows FP16: not declared for
    # fp16-static, declared as another kind for fp16: both fail
    res.assert_outcomes(passed=4, failed=2, xfailed=2, xpassed=1)
    out = res.stdout.str()
    assert f"XPASS harness::{SCENARIO}[log2=-30]-bf16-cpu - declared underflow: wrongly declared" in out
    assert (f"{SCENARIO}[log2=17] under fp16-static on cpu: overflow: output: 64 of 64 values inf/NaN where FP32 "
            "is finite") in out
    assert "(declared expected diverged, got overflow)" in out
    assert "harness: 3 references computed, 6 reused" in out


def test_junitxml_and_keyword_selection(run_user, tmp_path):
    xml = tmp_path / "junit.xml"
    res = run_user("-k", "fp16-static", f"--junitxml={xml}")
    res.assert_outcomes(passed=1, failed=1, xfailed=1, deselected=6)
    suite = ET.parse(xml).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    case = next(c for c in suite.iter("testcase") if c.get("name") == f"{SCENARIO}[log2=17]-fp16-static-cpu")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["outcome"] == "overflow" and props["rel_err"] == "inf" and props["nonfinite"] == "64"
    assert "64 of 64 values inf/NaN" in case.find("failure").get("message")
    # the family is a keyword too
    run_user("-k", "tiny_gradient and bf16").assert_outcomes(passed=2, xpassed=1, deselected=6)


@pytest.mark.parametrize("flag, value, message", [
    ("--harness-strategy", "fp17", "unknown strategy 'fp17'"),
    ("--harness-scenario", "nosuchscenario", "unknown scenario 'nosuchscenario'"),
    ("--harness-tier", "huge", "unknown tier 'huge'"),
    ("--harness-seeds", "0", "--harness-seeds '0': a whole number >= 1"),
])
def test_bad_options_are_usage_errors(pytester, flag, value, message):
    res = pytester.runpytest("--harness", flag, value, *QUIET)
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert message in res.stderr.str()


def test_filters_that_select_nothing_are_a_usage_error_as_in_run(pytester):
    # each filter matches alone, together nothing: `run` refused this and the plugin collected no item
    res = pytester.runpytest("--harness", "--harness-family", "tensor_core", "--harness-scenario", "softmax*", *QUIET)
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert "the filters select no scenario" in res.stderr.str()


def test_assert_robust_passes_and_returns_the_record():
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(0))
    rec = assert_robust(torch.softmax, (x, -1), "bf16", n=2)
    assert rec["outcome"] == "pass" and rec["strategy"] == "bf16"
    assert 0 < rec["metrics"]["rel_err"] <= rec["bound"]


def test_assert_robust_fails_with_the_verdicts_reason():
    x = 1000 + torch.randn(8, 1024, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match=r"layer_norm under bf16 on cpu: diverged: rel_err .* > .* \(bf16\)"):
        assert_robust(torch.nn.functional.layer_norm, (x, (1024,)), "bf16", n=4)


def test_assert_robust_trains_a_module_with_its_loss_scaler():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    rec = assert_robust(model, x, "fp16-dynamic", n=32, loss=lambda y: y.float().pow(2).mean() * 2.0**-20, steps=2)
    assert rec["outcome"] == "pass"
    assert rec["metrics"]["scaler"]["steps"] == 2 and rec["metrics"]["grad_rel_err"] > 0
    assert set(rec["window"]["per_tensor"]) == {"0.weight", "0.bias", "2.weight", "2.bias", "(all)"}
    # without a scaler the same tiny gradients flush to zero
    with pytest.raises(AssertionError, match="under fp16 on cpu: underflow: gradient"):
        assert_robust(model, x, "fp16", n=32, loss=lambda y: y.float().pow(2).mean() * 2.0**-40, steps=1)


def test_assert_robust_skips_an_unsupported_strategy():
    with pytest.raises(pytest.skip.Exception, match="reduction=reduced needs cuBLAS"):
        assert_robust(torch.softmax, (torch.ones(4, 8), -1), "compute=fp16,reduction=reduced")


def test_harness_check_fixture(pytester):
    pytester.makepyfile("""
        import torch

        def test_ok(harness_check):
            assert harness_check(torch.softmax, (torch.randn(2, 64), -1), "fp16", n=2)["outcome"] == "pass"

        def test_overflow(harness_check):
            harness_check(torch.exp, torch.full((8,), 12.0), "fp16")
    """)
    res = pytester.runpytest("--harness-device", "cpu", *QUIET)
    res.assert_outcomes(passed=1, failed=1)
    assert "exp under fp16 on cpu: overflow: output: 8 of 8 values inf/NaN" in res.stdout.str()
