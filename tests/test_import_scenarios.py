"""Users' own scenarios, black-box: ``run --import MODULE`` registers them from the user's module (found on
PYTHONPATH) without editing the project; a module that cannot be imported or registers a taken name
is one line on stderr and exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, read_jsonl, run_cli

EXAMPLES = ROOT / "examples"


def test_example_module_runs_through_import(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run_cli("run", "--import", "my_scenarios", "--scenario", "my_*", "--strategy", "fp32", "--strategy", "fp16",
                  "--strategy", "fp16-pure", "--device", "cpu", "--out", str(out), "--quiet", pythonpath=EXAMPLES)
    assert res.rc == 0, res.stderr
    records = read_jsonl(out / "records.jsonl")
    header = json.loads((out / "run.json").read_text())
    assert header["config"]["imports"] == ["my_scenarios"]
    # quick tier: 2 logsumexp cases + 1 MLP case, under 3 strategies
    assert sorted({r["case"] for r in records}) == ["my_mlp_adamw[width=64]", "my_naive_logsumexp[n=1024,shift=0]",
                                                    "my_naive_logsumexp[n=1024,shift=16]"]
    assert len(records) == 9
    got = {(r["case"], r["strategy"]): r["outcome"] for r in records}
    assert got[("my_naive_logsumexp[n=1024,shift=16]", "fp16")] == "overflow"
    assert got[("my_mlp_adamw[width=64]", "fp16-pure")] == "stalled"
    assert {o for (c, s), o in got.items() if s == "fp32"} == {"pass"}
    for r in records:  # the example declares every failure it shows
        assert r["outcome"] == (r["expected"] or {}).get("outcome", "pass"), (r["case"], r["strategy"], r["reason"])
    listed = run_cli("list", "--import", "my_scenarios", pythonpath=EXAMPLES)
    assert listed.rc == 0 and "my_naive_logsumexp" in listed.stdout and "my_mlp_adamw" in listed.stdout


DUPLICATE = '''
from harness.core.scenario import Output, Scenario, register
register(Scenario(name="{name}", family="reduction", description="d", grid={{}},
                  inputs=lambda p, g: {{}}, run=lambda ex, i, p: Output()))
'''


@pytest.mark.parametrize("module,source,message", [
    ("broken_mod", "import torch\nraise RuntimeError('boom in user code')\n",
     "error: --import broken_mod: cannot import it (RuntimeError: boom in user code); pass an importable module"),
    ("taken_mod", DUPLICATE.format(name="update_swamping"),
     "error: --import taken_mod: scenario 'update_swamping' is registered twice; rename one of them"),
    ("twice_mod", DUPLICATE.format(name="mine_twice") + DUPLICATE.format(name="mine_twice"),
     "error: --import twice_mod: scenario 'mine_twice' is registered twice; rename one of them"),
])
def test_bad_import_is_one_line_and_exit_2(tmp_path: Path, module: str, source: str, message: str) -> None:
    (tmp_path / f"{module}.py").write_text(source)
    res = run_cli("run", "--import", module, "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet",
                  pythonpath=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.rc == 2 and len(lines) == 1 and lines[0].startswith(message), res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()
