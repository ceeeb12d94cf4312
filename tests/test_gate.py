"""The regression gate, black-box through the CLI on golden run files and copies edited to regress."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.gate import Thresholds, compare, load_baseline, make_baseline
from harness.report import tables
from harness.results import SCHEMA_VERSION, case_key, read_run

GOLDEN = Path(__file__).parent / "golden" / "cpu_small"
ROOT = Path(__file__).resolve().parents[1]
SOFTMAX_BF16 = "softmax_long[n=4096,scale=1]#0|bf16"  # pass, rel_err well above 0.1 * bound


def _copy(tmp: Path, edit=None, header_edit=None) -> Path:
    """A copy of the golden run; ``edit(records_by_key)`` and ``header_edit(header)`` change it in place."""
    d = tmp / "run"
    shutil.copytree(GOLDEN, d)
    header, records = read_run(d)
    by_key = {case_key(r): r for r in records}
    if edit:
        edit(by_key)
    if header_edit:
        header_edit(header)
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in by_key.values()))
    (d / "run.json").write_text(json.dumps(header))
    return d


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "cpu.json"
    assert main(["gate", str(GOLDEN), "--baseline", str(path), "--update"]) == 0
    return path


def _gate(run: Path, baseline: Path, *extra: str, capsys) -> tuple[int, str, str]:
    rc = main(["gate", str(run), "--baseline", str(baseline), *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_update_writes_one_json_baseline(baseline):
    b = json.loads(baseline.read_text())
    _, records = read_run(GOLDEN)
    assert b["schema_version"] == SCHEMA_VERSION and b["device_class"] == "cpu" and b["tier"] == "quick"
    assert len(b["cases"]) == len(records) == 65
    rec = next(r for r in records if case_key(r) == SOFTMAX_BF16)
    entry = b["cases"][SOFTMAX_BF16]
    assert entry["outcome"] == "pass" and entry["strategy"] == "bf16" and entry["family"] == "reduction"
    assert entry["metrics"] == {"rel_err": float(f"{rec['metrics']['rel_err']:.4g}")}  # 4 significant digits
    assert b["cases"]["sum_long[n=1048576,data=same_sign]#0|fp16"]["metrics"] == {"rel_err": "inf"}


def test_the_same_run_passes(baseline, capsys):
    rc, out, _ = _gate(GOLDEN, baseline, capsys=capsys)
    assert rc == 0
    assert "65 cases compared" in out and "gate ok: 0 regressions, 0 improvements, 0 notices" in out


@pytest.mark.parametrize("old_key, new, rule, rc", [
    (SOFTMAX_BF16, "diverged", "pass -> diverged", 1),                                   # pass to a failure
    ("softmax_long[n=4096,scale=30]#0|bf16", "overflow", "diverged -> overflow", 1),     # to a worse failure
    ("sum_long[n=1048576,data=same_sign]#0|fp16", "diverged",                             # a milder failure
     "overflow -> diverged (a declared expected failure)", 0),
    (SOFTMAX_BF16, "unsupported", "pass -> unsupported", 1),                             # pass to anything else
])
def test_outcome_rule(tmp_path, baseline, capsys, old_key, new, rule, rc):
    def edit(by):
        by[old_key].update(outcome=new, reason="edited for the test")
    got, out, _ = _gate(_copy(tmp_path, edit), baseline, capsys=capsys)
    assert got == rc
    section = "REGRESSIONS (1)" if rc else "improvements (1)"
    assert section in out and f"outcome  {old_key}: {rule}: edited for the test" in out


def test_a_failure_that_becomes_unsupported_is_a_notice(tmp_path, baseline, capsys):
    key = "softmax_long[n=4096,scale=30]#0|bf16"
    rc, out, _ = _gate(_copy(tmp_path, lambda by: by[key].update(outcome="unsupported")), baseline, capsys=capsys)
    assert rc == 0 and "notices (1)" in out and f"{key}: diverged -> unsupported" in out


def test_error_growth_beyond_the_factor_is_a_regression(tmp_path, baseline, capsys):
    old = read_run(GOLDEN)[1]
    e = next(r for r in old if case_key(r) == SOFTMAX_BF16)["metrics"]["rel_err"]
    rc, out, _ = _gate(_copy(tmp_path, lambda by: by[SOFTMAX_BF16]["metrics"].update(rel_err=5 * e)), baseline,
                       capsys=capsys)
    assert rc == 1
    assert f"error    {SOFTMAX_BF16}: rel_err {float(f'{e:.4g}'):.3g} -> {5 * e:.3g} (x5 > x4;" in out


def test_error_growth_within_the_factor_or_under_the_floor_passes(tmp_path, baseline, capsys):
    tiny = "softmax_long[n=4096,scale=1000]#0|bf16"  # rel_err 8.3e-11, bound 1.9e-2

    def edit(by):
        by[SOFTMAX_BF16]["metrics"]["rel_err"] *= 3.9
        by[tiny]["metrics"]["rel_err"] *= 1000   # x1000, but still below 0.1 * bound
    rc, out, _ = _gate(_copy(tmp_path, edit), baseline, capsys=capsys)
    assert rc == 0 and "0 regressions" in out
    # without the floor the tiny error's growth counts
    rc, out, _ = _gate(_copy(tmp_path / "b", edit), baseline, "--error-floor", "0", capsys=capsys)
    assert rc == 1 and f"error    {tiny}: rel_err 8.33e-11 -> 8.33e-08 (x1e+03 > x4;" in out


def test_error_shrinking_is_listed_as_an_improvement(tmp_path, baseline, capsys):
    rc, out, _ = _gate(_copy(tmp_path, lambda by: by[SOFTMAX_BF16]["metrics"].update(rel_err=1e-4)), baseline,
                       capsys=capsys)
    assert rc == 0 and "improvements (1)" in out and f"{SOFTMAX_BF16}: rel_err 0.00404 -> 0.0001 (x0.0248)" in out


def _synthetic(fails: int, n: int = 40) -> list[dict]:
    return [{"case": f"c{i}", "seed": 0, "strategy": "s", "family": "f", "outcome": "diverged" if i < fails else "pass",
             "metrics": {}, "reason": ""} for i in range(n)]


def test_rate_rule_needs_a_rise_beyond_the_margin_and_the_interval():
    base = make_baseline({"environment": {"device": "cpu"}}, _synthetic(4))
    header = {"environment": {"device": "cpu"}}
    rate = [f for f in compare(base, header, _synthetic(12)).regressions if f.rule == "rate"]
    # 4/40 -> 12/40: +20 points, and the run's Wilson interval [18.1%, 45.4%] lies above 10%
    assert len(rate) == 1 and rate[0].key == "s"
    assert rate[0].message.startswith("failure rate 4/40 10.0% -> 12/40 30.0% (+20.0 points; 95% CI of the run "
                                      "18.1%-45.4%)")
    # 4/40 -> 7/40: +7.5 points > 5, but 10% lies inside the run's interval [8.7%, 32.0%]: noise
    assert not [f for f in compare(base, header, _synthetic(7)).regressions if f.rule == "rate"]
    # a margin of 25 points lets +20 through
    assert not [f for f in compare(base, header, _synthetic(12), Thresholds(rate_margin=0.25)).regressions
                if f.rule == "rate"]


def test_missing_and_new_cases(tmp_path, baseline, capsys):
    gone = "softmax_long[n=4096,scale=1]#0|fp16"

    def edit(by):
        extra = dict(by[SOFTMAX_BF16], seed=1)
        by.pop(gone)
        by[case_key(extra)] = extra
    run = _copy(tmp_path, edit)
    rc, out, _ = _gate(run, baseline, capsys=capsys)
    assert rc == 1 and f"missing  {gone}: in the baseline (pass), not in this run" in out
    assert "new      softmax_long[n=4096,scale=1]#1|bf16: not in the baseline (pass)" in out
    assert _gate(run, baseline, "--allow-missing", capsys=capsys)[0] == 0
    rc, out, _ = _gate(run, baseline, "--allow-missing", "--fail-on-new", capsys=capsys)
    assert rc == 1 and "REGRESSIONS (1)" in out


def test_json_output(tmp_path, baseline, capsys):
    rc, out, _ = _gate(_copy(tmp_path, lambda by: by[SOFTMAX_BF16].update(outcome="error", reason="boom")),
                       baseline, "--json", capsys=capsys)
    doc = json.loads(out)
    assert rc == 1 and doc["exit_code"] == 1 and doc["compared"] == 65
    assert doc["regressions"] == [{"rule": "outcome", "key": SOFTMAX_BF16, "message": "pass -> error: boom",
                                   "regression": True}]


def _write(tmp: Path, doc) -> Path:
    p = tmp / "b.json"
    p.write_text(json.dumps(doc))
    return p


@pytest.mark.parametrize("change, message", [
    ({"schema_version": 0}, "has schema version 0, this harness writes 1; regenerate it with"),
    ({"device_class": "cuda:NVIDIA H200"}, "is for device class 'cuda:NVIDIA H200' but the run is 'cpu'"),
    ({"kind": "something else"}, "is not a harness baseline"),
])
def test_incompatible_baselines_are_refused(tmp_path, baseline, capsys, change, message):
    doc = {**json.loads(baseline.read_text()), **change}
    rc, out, err = _gate(GOLDEN, _write(tmp_path, doc), capsys=capsys)
    assert rc == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["gate", "DIR", "--baseline", "nowhere.json"], "nowhere.json does not exist; write one with"),
    (["gate", "no-such-dir", "--baseline", "B"], "not a run directory"),
    (["gate", "DIR", "--baseline", "B", "--error-factor", "abc"], "'abc' is not a number"),
    (["gate", "DIR", "--baseline", "B", "--error-factor", "1"], "--error-factor 1: must be > 1"),
    (["gate", "DIR", "--baseline", "B", "--rate-margin", "2"], "--rate-margin 2: a failure-rate difference"),
    (["gate", "DIR"], "the following arguments are required: --baseline"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, baseline, capsys, args, message):
    args = [str(GOLDEN) if a == "DIR" else str(baseline) if a == "B" else str(tmp_path / a) if a.endswith(".json")
            else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_run_without_header_is_refused(tmp_path, baseline, capsys):
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy(GOLDEN / "records.jsonl", d / "records.jsonl")
    rc, _, err = _gate(d, baseline, capsys=capsys)
    assert rc == 2 and "no run.json with an environment" in err


def test_update_refuses_an_incomplete_run(tmp_path, capsys):
    run = _copy(tmp_path, header_edit=lambda h: h.update(status="interrupted"))
    rc, _, err = _gate(run, tmp_path / "b.json", "--update", capsys=capsys)
    assert rc == 2 and "run status is 'interrupted', not 'complete'" in err and not (tmp_path / "b.json").exists()


def test_gate_and_reports_import_no_torch():
    code = ("import sys, harness.gate, harness.report.cli, harness.report.html; "
            "print(sorted(m for m in sys.modules if m in ('torch', 'harness.engine', 'harness.verdict')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_committed_cpu_baseline_covers_the_quick_tier():
    """results/baselines/cpu.json is what `.ci/run` gates against: a CPU quick-tier baseline of every case."""
    from harness.scenario import cases, discover
    from harness.strategy import PRESETS
    b = load_baseline(ROOT / "results" / "baselines" / "cpu.json")
    assert b["device_class"] == "cpu" and b["tier"] == "quick"
    keys = {f"{c.id}#{c.seed}|{s}" for c in cases(list(discover()), "quick", 1) for s in PRESETS}
    stale = sorted(keys ^ set(b["cases"]))
    assert not stale, (f"results/baselines/cpu.json is stale ({len(stale)} case keys differ, e.g. {stale[:3]}); "
                       "regenerate it as docs/gate.md says")
