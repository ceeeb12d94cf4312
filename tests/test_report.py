"""Reports from golden run files: tables, Wilson intervals, Markdown and HTML escaping, two-run comparison,
the device-profile and asv sections, and the gradient histogram the reference records."""
from __future__ import annotations

import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest

from harness.cli import main
from harness.report import compare, html, tables
from harness.report.markdown import md_escape, render_table
from harness.results import case_key, read_run

GOLDEN = Path(__file__).parent / "golden"
CPU, H200 = GOLDEN / "cpu_small", GOLDEN / "h200_small"
EVIL = "<script>alert('x')</script> | `code` *bold* [link](http://example.invalid)"


@pytest.fixture(scope="module")
def cpu():
    return read_run(CPU)


def _edited(tmp: Path, edit) -> Path:
    d = tmp / "run"
    shutil.copytree(CPU, d)
    _, records = read_run(d)
    edit(records)
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


def test_wilson_matches_the_published_intervals():
    assert [round(x, 4) for x in tables.wilson(5, 10)] == [0.2366, 0.7634]
    assert [round(x, 4) for x in tables.wilson(0, 10)] == [0.0, 0.2775]
    assert [round(x, 4) for x in tables.wilson(10, 10)] == [0.7225, 1.0]
    assert tables.wilson(0, 0) == (0.0, 1.0)


def test_failure_table_of_the_golden_run(cpu):
    t = tables.failure_table(cpu[1])
    assert t.head == ["strategy", "failed/judged", "rate [95% CI]", "exploding_loss", "reduction", "tiny_gradient",
                      "training"]
    rows = {r[0]: r for r in t.rows}
    assert rows["fp16"] == ["fp16", "3/13", "23.1% [8-50]", "0/2 0%", "1/7 14%", "2/3 67%", "0/1 0%"]
    assert rows["fp32"][1:3] == ["0/13", "0.0% [0-23]"]


def test_unsupported_cases_are_not_judged():
    recs = [{"strategy": "s", "family": "f", "outcome": o} for o in ("pass", "diverged", "unsupported", "unsupported")]
    assert tables.failure_rate(tables.counts_from_records(recs)[0]["s"]) == (1, 2)


def test_fp16_against_bf16_with_the_breakdown(cpu):
    t = tables.format_comparison_table(cpu[1])
    rows = {r[0]: r for r in t.rows}
    assert rows["all"] == ["all", "5/26 19.2% [9-38]", "pass 21 overflow 2 underflow 2 stalled 1",
                           "2/13 15.4% [4-42]", "pass 11 diverged 2"]
    assert rows["tiny_gradient"][1:3] == ["2/6 33.3% [10-70]", "pass 4 underflow 2"]
    assert t.note == "strategies pooled per format: fp16: fp16, fp16-dynamic; bf16: bf16"


def test_compute_format_reads_the_spec():
    assert tables.compute_format({"strategy_spec": "compute=bf16,apply=cast,params=bf16"}) == "bf16"
    assert tables.compute_format({"strategy_spec": "apply=cast, compute=fp8,fp8=delayed"}) == "fp8"
    assert tables.compute_format({}) == "?"


def test_markdown_escapes_what_could_break_a_table():
    assert md_escape("a|b") == r"a\|b"
    assert md_escape("`x` *y* _z_ [l]") == r"\`x\` \*y\* \_z\_ \[l\]"
    assert md_escape("<b>&\nnext") == "&lt;b&gt;&amp; next"
    text = render_table(tables.Table("t", ["strategy", "reason"], [[EVIL, "a|b|c"]]))
    row = text.splitlines()[4]
    assert len(re.findall(r"(?<!\\)\|", row)) == 3  # the row still has exactly its two cells
    assert "<script>" not in text and "&lt;script&gt;" in text


def test_report_prints_the_tables(capsys):
    assert main(["report", str(CPU)]) == 0
    out = capsys.readouterr().out
    assert "Failure rate by strategy and family" in out and "FP16 against BF16" in out
    assert re.search(r"^fp16\s+3/13\s+23\.1% \[8-50\]", out, re.M)


def test_report_writes_markdown_and_html(tmp_path, capsys):
    md, page = tmp_path / "r.md", tmp_path / "out" / "r.html"
    assert main(["report", str(CPU), "--markdown", str(md), "--html", str(page)]) == 0
    text = md.read_text()
    assert "| fp16 | 3/13 | 23.1% \\[8\\-50\\] |" not in text  # brackets are escaped, dashes are not
    assert "| fp16 | 3/13 | 23.1% \\[8-50\\] | 0/2 0% | 1/7 14% | 2/3 67% | 0/1 0% |" in text
    doc = page.read_text()
    for section in ("env", "rates", "pair", "error-n", "grad-hist", "scale", "windows", "failures"):
        assert f'<section id="{section}">' in doc
    assert doc.count("<svg") == 7  # rates, heatmap, FP16/BF16, error against n, histogram, trajectories, windows
    assert "no gradient histograms" not in doc and "no dynamic scaler" not in doc


def test_html_is_self_contained_and_escapes_run_strings(tmp_path):
    def edit(records):
        records[0].update(strategy=EVIL, outcome="error", reason=EVIL)
    header, records = read_run(_edited(tmp_path, edit))
    doc = html.render_html([("run <1>", header, records[:15])])  # 15 records draw every kind of plot but one
    assert "<script" not in doc and "&lt;script&gt;" in doc and "run &lt;1&gt;" in doc
    # nothing is fetched: no src or href leaves the page (xmlns declarations are names, not requests)
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", doc)
    assert "<link" not in doc and "@import" not in doc


def test_failing_cases_list_the_unexpected_first(cpu):
    t = html._failures(cpu[1])
    assert [r[:5] for r in t.rows[:2]] == [
        ["scaled_grad_overflow[log2_grad=10,steps=16]", "0", "fp16-dynamic", "stalled", "unexpected"],
        ["sum_long[n=1048576,data=same_sign]", "0", "fp16", "overflow", "unexpected (declared diverged)"]]
    assert [r[4] for r in t.rows[2:]] == ["unexpected (declared diverged)"] + ["expected"] * 5
    assert t.note == "8 failing records, 3 of them unexpected (listed first)"


def test_device_profile_is_rendered_as_a_table(tmp_path):
    def edit(records):
        records[0]["metrics"]["profile"] = {"gpu": "NVIDIA H200", "fp16": {"tflops": 701.5, "accumulator_bits": 24},
                                            "note": "<i>measured</i>"}
        records[1]["profile"] = dict(records[0]["metrics"]["profile"])
    header, records = read_run(_edited(tmp_path, edit))
    tabs = html.profiles(records)
    assert len(tabs) == 1
    assert tabs[0].rows == [["gpu", "NVIDIA H200"], ["fp16.tflops", "701.5"], ["fp16.accumulator_bits", "24"],
                            ["note", "<i>measured</i>"]]
    assert "2 more" not in tabs[0].title and tabs[0].title.count("scaled_grad_overflow") == 2
    secs = {sid: body for sid, _, body in html.run_sections("r", header, records[:2])}
    assert "<td>&lt;i&gt;measured&lt;/i&gt;</td>" in secs["profile"]
    assert "profile" not in {sid for sid, _, _ in html.run_sections("r", header, records[2:4])}


def test_asv_section_is_optional_and_guarded(monkeypatch, tmp_path, cpu):
    fake = types.ModuleType("harness.report.asv_history")
    fake.history_svg = lambda d: '<svg id="asvfake"></svg>'
    monkeypatch.setitem(sys.modules, "harness.report.asv_history", fake)
    assert html._asv_section(None) is None and html._asv_section(tmp_path / "missing") is None
    assert '<svg id="asvfake"></svg>' in html._asv_section(tmp_path)[2]

    def broken(d):
        raise RuntimeError("no results <here>")
    fake.history_svg = broken
    assert "no asv history: no results &lt;here&gt;" in html._asv_section(tmp_path)[2]
    doc = html.render_html([("r", header, records[:1]) for header, records in [cpu]], asv_dir=tmp_path)
    assert '<section id="asv"><h2>History across commits (asv)</h2>' in doc


def test_two_runs_are_compared(capsys, cpu):
    h200 = read_run(H200)
    a, b = ("cpu", *cpu), ("h200", *h200)
    env = {r[0]: r for r in compare.environment_diff(a, b).rows}
    assert env["torch"] == ["torch", "2.13.0+cpu", "2.11.0+cu130", "*"] and env["gpu"][1:] == ["-", "NVIDIA H200", "*"]
    assert env["tier"][3] == ""
    rates = {r[0]: r for r in compare.rate_comparison(a, b).rows}
    assert rates["fp16"] == ["fp16", "3/13 23.1% [8-50]", "4/12 33.3% [14-61]", "+10.3", ""]
    changes = compare.outcome_changes(a, b)
    assert changes.rows == [] and changes.note == "35 cases in both, 0 changed; 30 only in cpu, 25 only in h200"
    assert main(["report", str(CPU), str(H200)]) == 0
    assert "Cases whose outcome changed" in capsys.readouterr().out


def test_outcome_changes_list_the_case_and_both_outcomes(tmp_path, cpu):
    key = "softmax_long[n=4096,scale=1]#0|bf16"

    def edit(records):
        next(r for r in records if case_key(r) == key).update(outcome="diverged", reason="rel_err 1 > 0.02")
    b = read_run(_edited(tmp_path, edit))
    t = compare.outcome_changes(("a", *cpu), ("b", *b))
    assert t.rows == [[key, "pass", "diverged", "rel_err 1 > 0.02"]]


@pytest.mark.parametrize("args, message", [
    (["report", "no-such-dir"], "not a run directory"),
    (["report", "A", "A", "A"], "report takes one run directory or two to compare, got 3"),
    (["report", "A", "--html", "DIR"], "is a directory; pass a file name"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    args = [str(CPU) if a == "A" else str(tmp_path) if a == "DIR" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_reference_records_a_log2_histogram_with_the_format_ranges():
    import torch

    from harness.run.reference import log2_histogram
    h = log2_histogram({"a": torch.tensor([0.5, 0.75, 2.0**-30, 0.0, float("inf")]), "b": torch.tensor([-3.0])})
    assert h["lo"] == -30 and h["zeros"] == 1
    assert h["counts"] == [1] + [0] * 28 + [2, 0, 1]  # binades -30 (2^-30), -1 (0.5, 0.75), 1 (3)
    assert h["formats"]["fp16"] == {"smallest": 2.0**-24, "min_normal": 2.0**-14, "max": 65504.0}
    assert h["formats"]["fp8_e4m3"]["max"] == 448.0


# -- intervals at the edges, margins, streaming, the committed H200 runs ----------------------------
def test_wilson_holds_the_estimate_exactly_at_0_and_100_percent():
    """c - h lands an ulp above 0 and c + h an ulp below 1 (4/4 gave 0.9999999999999999), so a plot got a
    negative error bar and matplotlib refused it ('yerr' must not contain negative values)."""
    for n in range(1, 2001):
        for k in (0, 1, n // 2, n - 1, n):
            lo, hi = tables.wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
        assert tables.wilson(0, n)[0] == 0.0 and tables.wilson(n, n)[1] == 1.0


ROOT = Path(__file__).resolve().parents[1]
H200_RUNS = [ROOT / "results" / "h200" / "scaling_and_update_quick", ROOT / "results" / "h200" / "accumulation_full",
             H200]


@pytest.mark.parametrize("run", H200_RUNS, ids=lambda p: p.name)
def test_html_report_of_the_committed_h200_runs(tmp_path, capsys, run):
    pytest.importorskip("matplotlib")
    page = tmp_path / "r.html"
    assert main(["report", str(run), "--html", str(page)]) == 0, capsys.readouterr().err
    doc = page.read_text()
    assert doc.count("<svg") >= 3 and "Failure rate per strategy" in doc


def _margin_records() -> list[dict]:
    margins = {"fp16": [0.25, 0.5, 1.0, None], "bf16": [0.125, 0.75, "nan", 2.0**-10]}
    out = []
    for s, ms in margins.items():
        for i, m in enumerate(ms):
            out.append({"strategy": s, "family": "reduction", "outcome": "pass", "strategy_spec": f"compute={s}",
                        "margin": m, "case": f"c{i}", "seed": 0})
    out.append({"strategy": "fp16", "family": "reduction", "outcome": "diverged", "margin": 8.0, "case": "c9",
                "seed": 0, "strategy_spec": "compute=fp16"})
    return out


def test_margin_table_gives_median_and_max_of_passing_cases():
    t = tables.margin_table(_margin_records())
    assert t.head == ["strategy", "with margin/passed", "median", "max", "non-finite"]
    rows = {r[0]: r[1:] for r in t.rows}
    # fp16: 0.25, 0.5, 1 (the failing case's 8 is not a pass; one pass has no margin)
    assert rows["fp16"] == ["3/4", "0.5", "1", ""]
    # bf16: 2^-10, 0.125, 0.75 finite (median of an odd count), NaN counted apart, never ordered
    assert rows["bf16"] == ["4/4", "0.125", "0.75", "1"]
    assert tables.margin_table([{"strategy": "s", "family": "f", "outcome": "pass"}]).rows == []  # older runs


def test_report_prints_the_margin_table(tmp_path, capsys):
    d = tmp_path / "run"
    shutil.copytree(CPU, d)
    _, records = read_run(d)
    seen: dict[str, int] = {}
    for r in records:  # per strategy 1, 0.5, 0.25, 0.125, 1, ...
        i = seen[r["strategy"]] = seen.get(r["strategy"], -1) + 1
        r["margin"] = 2.0 ** -(i % 4)
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["report", str(d)]) == 0
    out = capsys.readouterr().out
    # fp32's 13 passes: 0.125 x3, 0.25 x3, 0.5 x3, 1 x4: the median is the 7th, 0.5
    assert "Margin of passing cases" in out and re.search(r"^fp32\s+13/13\s+0\.5\s+1$", out, re.M), out


def test_unknown_outcomes_are_never_counted_as_passes():
    with pytest.raises(AssertionError, match="outcomes \\['fine'\\]"):
        tables.failure_rate({"pass": 3, "fine": 19})


def test_the_summary_keeps_counts_not_records():
    """Memory flat in the record count, structurally: ten times the records, the same state (plus 8 bytes
    per passing record's margin), and every record dropped as soon as it is counted."""
    import weakref
    recs = _margin_records()
    small, big = tables.summarize(recs), tables.summarize(recs * 10)
    assert big.records == 10 * small.records == 90
    for attr in ("by_strategy", "by_family", "by_format", "specs", "formats"):
        assert len(getattr(big, attr)) == len(getattr(small, attr)), attr
    assert big.by_strategy["fp16"] == {"pass": 40, "diverged": 10}
    refs, alive = [], []

    def stream():
        for r in recs * 10:
            alive.append(sum(ref() is not None for ref in refs))
            box = type("Rec", (dict,), {})(r)
            refs.append(weakref.ref(box))
            yield box
            del box

    tables.summarize(stream())
    assert max(alive) == 1


def test_report_streams_each_run():
    """`report DIR` holds no run: its runs are RunRecords (re-read per pass), and the tables of one run
    take one pass that keeps no record."""
    import weakref
    from harness.report.cli import load_runs, run_tables
    from harness.results import RunRecords
    (label, header, recs), = load_runs([CPU])
    assert isinstance(recs, RunRecords) and label == "cpu_small"
    refs, alive, passes = [], [], []

    class Counted:
        def __iter__(self):
            passes.append(1)
            for r in recs:
                alive.append(sum(ref() is not None for ref in refs))
                box = type("Rec", (dict,), {})(r)
                refs.append(weakref.ref(box))
                yield box
                del box

    tabs = run_tables((label, header, Counted()))
    assert len(passes) == 1 and len(refs) == 65 and max(alive) <= 1
    assert [t.title for t in tabs][-1] == "Margin of passing cases"


def test_error_plot_survives_nan_and_inf_bounds():
    pytest.importorskip("matplotlib")
    from harness.report import plots
    recs = [{"strategy": "fp16", "strategy_spec": "compute=fp16", "family": "reduction", "outcome": o, "n": n,
             "bound": b, "metrics": {"rel_err": e}} for o, n, b, e in
            [("pass", 64, 2.0**-8, 2.0**-10), ("diverged", 256, "inf", 0.5), ("pass", 1024, "nan", 2.0**-9),
             ("overflow", 4096, 2.0**-6, "nan")]]
    assert plots.error_vs_n_svg(recs).startswith("<svg")
    assert plots.error_vs_n_svg(recs[1:3]) is None  # no usable bound: nothing to draw against
