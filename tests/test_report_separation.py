"""The report's "which scenario separates which recipes" tables, on small synthetic run files."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from harness.cli import main
from harness.report.separation import recipe_of, separate, separation_tables, spec_value
from harness.results import RunWriter

SPECS = {
    "fp32": "compute=fp32,apply=autocast",
    "fp8-tensorwise": "compute=fp8,apply=autocast,params=fp32,fp8=tensorwise",
    "torchao-fp8-tensorwise": "compute=fp8,apply=autocast,params=fp32,fp8=tensorwise,lib=torchao",
    "fp8-rowwise": "compute=fp8,apply=autocast,params=fp32,fp8=rowwise",
    "torchao-fp8-rowwise": "compute=fp8,apply=autocast,params=fp32,fp8=rowwise,lib=torchao",
    "fp8-delayed": "compute=fp8,apply=autocast,params=fp32,fp8=delayed",
    "fp8-blockwise": "compute=fp8,apply=autocast,params=fp32,fp8=blockwise(128)",
    "nvfp4": "compute=fp4,apply=autocast,params=fp32,fp8=nvfp4",
}
#: (case, seed) -> outcome per strategy: spike separates delayed; grad separates blockwise; torchao's rowwise
#: disagrees with the own rowwise on one seed (and torchao's tensorwise, another recipe, with the own
#: tensorwise); nvfp4 is unsupported everywhere.
OUTCOMES = {
    ("spike[s=8]", 0): {"fp32": "pass", "fp8-tensorwise": "pass", "torchao-fp8-tensorwise": "pass",
                        "fp8-delayed": "diverged", "fp8-blockwise": "pass", "fp8-rowwise": "pass",
                        "torchao-fp8-rowwise": "pass"},
    ("grad[layout=tokens]", 0): {"fp32": "pass", "fp8-tensorwise": "pass", "torchao-fp8-tensorwise": "pass",
                                 "fp8-delayed": "pass", "fp8-blockwise": "underflow", "fp8-rowwise": "pass",
                                 "torchao-fp8-rowwise": "pass"},
    ("grad[layout=tokens]", 1): {"fp32": "pass", "fp8-tensorwise": "pass", "torchao-fp8-tensorwise": "overflow",
                                 "fp8-delayed": "pass", "fp8-blockwise": "underflow", "fp8-rowwise": "pass",
                                 "torchao-fp8-rowwise": "overflow"},
}


def _records() -> list[dict]:
    out = []
    for (case, seed), per in OUTCOMES.items():
        for s, spec in SPECS.items():
            o = per.get(s, "unsupported")
            out.append({"schema_version": 1, "scenario": case.split("[")[0], "case": case, "family": "tiny_gradient",
                        "params": {}, "seed": seed, "strategy": s, "strategy_spec": spec, "device": "cpu",
                        "outcome": o, "reason": "r", "metrics": {}, "seconds": 0.0})
    return out


def test_spec_value_keeps_parenthesised_commas_and_recipes_group_implementations() -> None:
    assert spec_value("compute=fp16,scaler=dynamic(init=2^16,growth=2),master=no", "scaler") == \
        "dynamic(init=2^16,growth=2)"
    assert spec_value("compute=fp16", "fp8") is None
    recs = {r["strategy"]: r for r in _records()}
    assert recipe_of(recs["fp32"]) is None
    assert recipe_of(recs["fp8-tensorwise"]) == ("fp8=tensorwise", "own")
    # torchao's tensorwise is not the own one (BF16 input cast, BF16 bias, fast accumulation on a GPU)
    assert recipe_of(recs["torchao-fp8-tensorwise"]) == ("fp8=tensorwise (torchao's)", "lib=torchao")
    assert recipe_of(recs["torchao-fp8-rowwise"]) == ("fp8=rowwise", "lib=torchao")
    assert recipe_of(recs["fp8-blockwise"]) == ("fp8=blockwise(128)", "own")
    assert recipe_of(recs["nvfp4"]) == ("fp4=nvfp4", "own")


def test_pairs_count_the_cases_that_differ_over_those_judged_for_both() -> None:
    sep = separate(_records())
    assert sep.pair("fp8-tensorwise", "fp8-delayed") == (3, [("spike[s=8]", "pass", "diverged")])
    judged, differ = sep.pair("fp8-blockwise", "fp8-tensorwise")
    assert judged == 3 and [d[0] for d in differ] == ["grad[layout=tokens]", "grad[layout=tokens]#1"]
    assert sep.pair("nvfp4", "fp8-tensorwise") == (0, [])  # unsupported is never judged
    assert sep.pair("fp8-tensorwise", "torchao-fp8-tensorwise") == (3, [("grad[layout=tokens]#1", "pass",
                                                                           "overflow")])


def test_tables_flag_unseparated_recipes_and_disagreeing_implementations() -> None:
    recs = _records()
    # drop the spike case: nothing separates delayed from tensorwise any more
    pairs, summary = separation_tables([r for r in recs if r["case"] != "spike[s=8]"])
    assert len(pairs.rows) == 21  # 7 FP8/FP4 strategies, fp32 left out
    row = {(r[0], r[1]): r for r in pairs.rows}
    delayed = row[("fp8-delayed", "fp8-tensorwise")]
    assert delayed[2:] == ["different recipes", "0/2", "none: indistinguishable"]
    assert row[("fp8-rowwise", "torchao-fp8-rowwise")][2] == "same recipe (fp8=rowwise)"
    assert row[("fp8-tensorwise", "torchao-fp8-tensorwise")][2] == "different recipes"
    found = {(r[0], r[1]): r[2] for r in summary.rows}
    assert found[("fp8-delayed", "fp8-tensorwise")] == "no scenario separates them"
    assert found[("fp8-rowwise", "torchao-fp8-rowwise")] == "implementations of one recipe disagree"
    assert ("fp8-tensorwise", "torchao-fp8-tensorwise") not in found  # two recipes, told apart by seed 1
    assert found[("fp8-blockwise", "nvfp4")] == "never both judged"
    assert ("fp8-blockwise", "fp8-delayed") not in found  # separated by the grad case
    assert "1 same-recipe pairs that disagree" in summary.note


def test_fewer_than_two_recipes_make_no_table() -> None:
    assert separation_tables([r for r in _records() if r["strategy"] in ("fp32", "fp8-tensorwise")]) == []


def test_report_command_prints_and_writes_the_tables(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    w = RunWriter(tmp_path / "run", {"environment": {"device": "cpu"}})
    for r in _records():
        w.append(r)
    w.close({})
    md = tmp_path / "r.md"
    assert main(["report", str(tmp_path / "run"), "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "Which scenario separates which recipes" in out and "Recipe pairs to look at" in out
    assert "spike[s=8] (pass / diverged)" in out
    assert "Which scenario separates which recipes" in md.read_text()
    if importlib.util.find_spec("matplotlib"):
        page = tmp_path / "r.html"
        assert main(["report", str(tmp_path / "run"), "--html", str(page)]) == 0
        assert "Recipe pairs to look at" in page.read_text()
