"""The regression gate, black-box through the CLI on golden run files and copies edited to regress."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
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
            "print(sorted(m for m in sys.modules if m in ('torch', 'harness.run.engine', 'harness.judge.verdict')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_the_gate_and_report_commands_run_without_torch(tmp_path):
    """`python -m harness report|gate` built every subcommand's parser, and check-model's imports torch: the
    views took 2 s and 200 MB for nothing, and failed on a laptop without torch. Torch is blocked here."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        from harness.cli import main
        rcs = [main(["report", {str(GOLDEN)!r}]),
               main(["gate", {str(GOLDEN)!r}, "--baseline", {str(tmp_path / 'b.json')!r}, "--update"]),
               main(["gate", {str(GOLDEN)!r}, "--baseline", {str(tmp_path / 'b.json')!r}])]
        import json
        print(json.dumps({{"rcs": rcs, "mods": sorted(m for m in sys.modules if m.startswith("harness."))}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["rcs"] == [0, 0, 0], out.stderr[-2000:]
    mods = set(doc["mods"])
    assert mods <= {"harness.cli", "harness.exits", "harness.results", "harness.results_schema", "harness.baseline",
                    "harness.gate", "harness.report", "harness.report.cli", "harness.report.compare",
                    "harness.report.markdown", "harness.report.separation", "harness.report.summary",
                    "harness.report.tables"}, mods


def test_committed_cpu_baseline_covers_the_quick_tier():
    """results/baselines/cpu.json is what `.ci/run` gates against: a CPU quick-tier baseline of every case."""
    from harness.core.scenario import cases, discover
    from harness.core.strategy import PRESETS
    b = load_baseline(ROOT / "results" / "baselines" / "cpu.json")
    assert b["device_class"] == "cpu" and b["tier"] == "quick"
    keys = {f"{c.id}#{c.seed}|{s}" for c in cases(list(discover()), "quick", 1) for s in PRESETS}
    stale = sorted(keys ^ set(b["cases"]))
    assert not stale, (f"results/baselines/cpu.json is stale ({len(stale)} case keys differ, e.g. {stale[:3]}); "
                       "regenerate it as docs/gate.md says")


# -- subsets, non-finite errors, margins, streaming -------------------------------------------------
COMMITTED = ROOT / "results" / "baselines" / "cpu.json"


def _records_of(cases: dict, family: str) -> list[dict]:
    """The records a run of one family would hold had nothing changed: the baseline's own cases."""
    out = []
    for key, c in cases.items():
        if c["family"] != family:
            continue
        case_seed, _, strategy = key.rpartition("|")
        case, _, seed = case_seed.rpartition("#")
        out.append({"schema_version": SCHEMA_VERSION, "scenario": c["scenario"], "case": case, "seed": int(seed),
                    "family": family, "strategy": strategy, "strategy_spec": "", "outcome": c["outcome"],
                    "reason": "", "metrics": dict(c["metrics"]), "bound": c["bound"]})
    return out


def _write_run(d: Path, records: list[dict]) -> Path:
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "status": "complete",
                                            "environment": {"device": "cpu"}, "config": {"tier": "quick"}}))
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


@pytest.mark.parametrize("family, cases", [("exploding_loss", 406), ("tiny_gradient", 435), ("training", 87),
                                           ("reduction", 551)])
def test_a_subset_is_rated_against_the_same_cases_of_the_committed_baseline(tmp_path, capsys, family, cases):
    """`run --family F` gated with --allow-missing: the rate rule compared the subset's failure rate with
    the whole baseline's (fp16-dynamic 26/63 -> 10/13 on exploding_loss: four 'rate' regressions, no
    outcome changed). Over the same cases nothing changed, so nothing is reported."""
    doc = json.loads(COMMITTED.read_text())
    recs = _records_of(doc["cases"], family)
    assert len(recs) == cases
    run = _write_run(tmp_path / "sub", recs)
    rc, out, _ = _gate(run, COMMITTED, "--allow-missing", capsys=capsys)
    assert rc == 0 and "REGRESSIONS" not in out and "rate " not in out, out
    assert f"{cases} cases compared" in out and "gate ok: 0 regressions, 0 improvements" in out


def test_a_rate_rise_within_a_subset_is_still_caught(tmp_path):
    doc = json.loads(COMMITTED.read_text())
    recs = _records_of(doc["cases"], "exploding_loss")
    for r in recs:
        if r["strategy"] == "bf16":
            r["outcome"] = "diverged" if r["outcome"] == "pass" else r["outcome"]
    base = load_baseline(COMMITTED)
    res = compare(base, {"environment": {"device": "cpu"}}, recs, Thresholds(allow_missing=True))
    rate = [f for f in res.regressions if f.rule == "rate"]
    # bf16 fails 3 of the family's 14 cases in the baseline (not its rate over every family)
    assert [f.key for f in rate] == ["bf16"] and rate[0].message.startswith("failure rate 3/14 21.4% -> 14/14 100.0%")


@pytest.mark.parametrize("value, shown", [("nan", "nan"), ("inf", "inf"), (float("nan"), "nan"), (None, "nan")])
def test_a_finite_error_that_becomes_non_finite_is_a_regression(tmp_path, baseline, capsys, value, shown):
    """NaN compares false both ways: `old > max(floor, 4*nan)` was true, so a NaN error was an improvement."""
    rc, out, _ = _gate(_copy(tmp_path, lambda by: by[SOFTMAX_BF16]["metrics"].update(rel_err=value)), baseline,
                       capsys=capsys)
    assert rc == 1 and "improvements (" not in out and "1 regressions, 0 improvements" in out
    assert f"error    {SOFTMAX_BF16}: rel_err 0.00404 -> {shown} (a finite error became non-finite)" in out


def test_a_non_finite_baseline_error_that_becomes_finite_is_an_improvement():
    base = make_baseline({"environment": {"device": "cpu"}}, _synthetic(0, 2))
    base["cases"]["c0#0|s"]["metrics"] = {"rel_err": "nan"}
    base["cases"]["c1#0|s"]["metrics"] = {"rel_err": "inf"}
    recs = [dict(r, metrics={"rel_err": 2.0**-10}) for r in _synthetic(0, 2)]
    res = compare(base, {"environment": {"device": "cpu"}}, recs)
    assert res.regressions == [] and [f.message for f in res.improvements] == [
        "rel_err nan -> 0.000977 (a non-finite error became finite)", "rel_err inf -> 0.000977 (a non-finite error "
        "became finite)"]
    # both non-finite: nothing to compare, nothing reported
    assert compare(base, {}, [dict(r, metrics={"rel_err": "nan"}) for r in _synthetic(0, 2)]).improvements == []


def test_a_nan_or_inf_bound_does_not_disable_or_break_the_error_rule():
    recs = [dict(r, metrics={"rel_err": 2.0**-10}, bound="nan") for r in _synthetic(0, 1)]
    base = make_baseline({"environment": {"device": "cpu"}}, recs)
    grown = [dict(r, metrics={"rel_err": 2.0**-4}) for r in recs]
    res = compare(base, {}, grown)  # an unusable bound sets no floor: the x64 growth is compared
    assert [f.message.split(" (")[0] for f in res.regressions] == ["rel_err 0.000977 -> 0.0625"]
    base["cases"]["c0#0|s"]["bound"] = "inf"
    assert [f.rule for f in compare(base, {}, grown).regressions] == ["error"]


def test_margin_is_shown_where_both_carry_it_and_old_files_without_it_still_gate():
    recs = [dict(r, metrics={"rel_err": 2.0**-10}, bound=2.0**-8, margin=0.25) for r in _synthetic(0, 1)]
    base = make_baseline({"environment": {"device": "cpu"}}, recs)
    assert base["cases"]["c0#0|s"]["margin"] == 0.25
    grown = [dict(r, metrics={"rel_err": 2.0**-6}, margin=1.0) for r in recs]
    assert [f.message for f in compare(base, {}, grown).regressions] == [
        "rel_err 0.000977 -> 0.0156 (x16 > x4; errors below 0.00039 = 0.1*bound 0.0039 are not compared); "
        "margin 0.25 -> 1"]
    del base["cases"]["c0#0|s"]["margin"]  # a baseline from before margins
    old_records = [{k: v for k, v in r.items() if k != "margin"} for r in grown]
    assert [f.message.endswith("are not compared)") for f in compare(base, {}, grown).regressions] == [True]
    assert len(compare(base, {}, old_records).regressions) == 1


def test_update_streams_the_same_bytes_as_the_dict_baseline(tmp_path, baseline):
    from harness.baseline import write_baseline
    header, records = read_run(GOLDEN)
    write_baseline(tmp_path / "b.json", header, iter(records), source=GOLDEN.name)
    assert (tmp_path / "b.json").read_text() == baseline.read_text()
    empty = tmp_path / "e.json"
    write_baseline(empty, header, [], source="x")
    assert json.loads(empty.read_text())["cases"] == {} and load_baseline(empty)["cases"] == {}


def test_load_baseline_reads_the_committed_file_case_by_case():
    from harness.baseline import as_case
    raw = json.loads(COMMITTED.read_text())
    b = load_baseline(COMMITTED)
    assert set(b["cases"]) == set(raw["cases"]) and all(isinstance(v, bytes) for v in b["cases"].values())
    assert all(as_case(b["cases"][k]) == as_case(v) for k, v in raw["cases"].items())
    assert {k: v for k, v in b.items() if k != "cases"} == {k: v for k, v in raw.items() if k != "cases"}


def test_compare_reads_the_run_once_and_holds_no_record(baseline):
    """The gate streams: each record is dropped once its rules ran (structural check of flat memory)."""
    import weakref
    header, records = read_run(GOLDEN)
    base = load_baseline(baseline)
    refs: list = []
    alive: list[int] = []

    def once():
        for r in records:  # (no cycles: a record the gate dropped is freed at once)
            alive.append(sum(ref() is not None for ref in refs))  # earlier records still held by the gate
            box = type("Rec", (dict,), {})(r)
            refs.append(weakref.ref(box))
            yield box
            del box

    res = compare(base, header, once())
    # at most the one record the gate's loop variable still names while it asks for the next
    assert res.compared == 65 and len(refs) == 65 and max(alive) == 1


def test_two_records_for_one_case_are_refused(tmp_path, baseline, capsys):
    d = _copy(tmp_path)
    lines = (d / "records.jsonl").read_text().splitlines(keepends=True)
    (d / "records.jsonl").write_text("".join(lines + lines[:1]))
    rc, out, err = _gate(d, baseline, capsys=capsys)
    assert rc == 2 and out == "" and "two records for" in err and len(err.strip().splitlines()) == 1


def test_a_rise_of_exactly_the_margin_is_not_a_regression():
    """5000/10000 -> 5500/10000 rises by exactly 5 points; 0.55 - 0.5 = 0.050000000000000044 in binary
    floating point, and the run's Wilson lower bound (0.540) lies above 0.5, so the float comparison
    reported a rise "by more than 5 points"."""
    base = make_baseline({"environment": {"device": "cpu"}}, _synthetic(5000, 10000))
    header = {"environment": {"device": "cpu"}}
    assert not [f for f in compare(base, header, _synthetic(5500, 10000)).regressions if f.rule == "rate"]
    rate = [f for f in compare(base, header, _synthetic(5501, 10000)).regressions if f.rule == "rate"]
    assert len(rate) == 1 and "5000/10000 50.0% -> 5501/10000 55.0%" in rate[0].message
