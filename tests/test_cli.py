"""Black-box tests of ``python -m harness``: listings, a small run, bad input, and the issue's acceptance.

Starting an interpreter costs seconds here (torch), so the many short invocations run in one fresh
interpreter (``cli_batch``), each through ``harness.cli.main`` (what ``python -m harness`` calls) with
its own stdout and stderr; the runs are separate processes end to end (the acceptance checks read the
session's ``quick_run``).
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT, cli_env, read_jsonl, run_cli
from harness.results import RECORD_FIELDS
from harness.core.strategy import PRESETS, parse

DRIVER = r"""
import contextlib, io, json, sys, traceback
from harness.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # what the interpreter would print for an uncaught exception
            traceback.print_exc()
            rc = 1
    results[name] = {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(results))
"""

ONE = ["--scenario", "softmax_long", "--strategy", "fp32", "--device", "cpu", "--quiet"]  # a small valid run
# name: (arguments, fragments the one stderr line must contain: the bad value and what is allowed)
BAD = {
    "unknown_scenario": (["run", "--scenario", "softmax_lon", "--strategy", "fp32"],
                         ["unknown scenario 'softmax_lon'", "did you mean softmax_long"]),
    "unknown_strategy": (["run", "--strategy", "fp61", "--scenario", "softmax_long"],
                         ["unknown strategy 'fp61'", "did you mean fp16", "presets: fp32, tf32, fp16"]),
    "malformed_spec": (["run", "--strategy", "compute=fp16,scaler=static(-1)", "--scenario", "softmax_long"],
                       ["loss scale must be a number from 2^-149 to 3.4e38", "got -1"]),
    "unbalanced_spec": (["run", "--strategy", "compute=fp16,scaler=static(2", "--scenario", "softmax_long"],
                        ["unbalanced parentheses", "'compute=fp16,scaler=static(2'"]),
    "huge_scale": (["run", "--strategy", "compute=fp16,scaler=static(2^100000)", "--scenario", "softmax_long"],
                   ["'2^100000' is too large"]),
    "unknown_tier": (["run", "--tier", "medium", *ONE], ["unknown tier 'medium'", "tiers: quick, full"]),
    "zero_seeds": (["run", "--seeds", "0", *ONE], ["--seeds", "must be >= 1, got 0"]),
    "unknown_device": (["run", "--device", "tpu", "--scenario", "softmax_long"],
                       ["unknown device 'tpu'", "use cpu, cuda or auto"]),
    "unknown_family": (["run", "--family", "reductions", "--strategy", "fp32"],
                       ["unknown family 'reductions'", "did you mean reduction", "families: reduction, tiny_gradient"]),
    "missing_import": (["run", "--import", "a_no_such_module", *ONE],
                       ["--import a_no_such_module: cannot import it", "No module named 'a_no_such_module'"]),
    "unknown_command": (["bogus"], ["invalid choice: 'bogus'", "'list'", "'run'"]),
}
if not torch.cuda.is_available():
    BAD["cuda_without_cuda"] = (["run", "--device", "cuda", "--scenario", "softmax_long"],
                                ["--device cuda: no CUDA device is available here", "use --device cpu or auto"])
#: Each test here starts interpreters, and the acceptance run covers the whole quick tier.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def cli_batch(out_dir: Path) -> dict[str, dict]:
    calls = {"list": ["list"], "list_json": ["list", "--json"], "strategies": ["strategies"],
             "strategies_json": ["strategies", "--json"]}
    for name, (argv, _) in BAD.items():
        calls[name] = argv + (["--out", str(out_dir / name)] if argv[0] == "run" else [])
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(calls)], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _records(d: Path) -> list[dict]:
    return read_jsonl(d / "records.jsonl")


# -- listings -------------------------------------------------------------------------------------
def test_list_shows_every_scenario(cli_batch: dict) -> None:
    text, js = cli_batch["list"], cli_batch["list_json"]
    assert text["rc"] == js["rc"] == 0
    items = json.loads(js["stdout"])
    assert {"softmax_long", "grad_magnitude_sweep", "loss_past_fp16_max"} <= {i["name"] for i in items}
    for i in items:
        assert set(i) >= {"name", "family", "description", "grid", "quick", "version"}
        assert any(line.split()[:2] == [i["name"], i["family"]] for line in text["stdout"].splitlines()), i["name"]
    assert text["stdout"].count("grid: ") == len(items)


def test_strategies_print_the_presets_with_canonical_specs(cli_batch: dict) -> None:
    text, js = cli_batch["strategies"], cli_batch["strategies_json"]
    assert text["rc"] == js["rc"] == 0
    rows = [line.split() for line in text["stdout"].splitlines()]  # name, library (words), spec
    assert [r[0] for r in rows] == list(PRESETS)
    assert all(r[-1] == str(PRESETS[r[0]]) and parse(r[-1]) == PRESETS[r[0]] for r in rows)
    listed = json.loads(js["stdout"])
    assert [{"name": i["name"], "spec": i["spec"]} for i in listed] == [{"name": n, "spec": str(s)}
                                                                      for n, s in PRESETS.items()]
    assert all(" ".join(r[1:-1]) == i["library"] for r, i in zip(rows, listed))
    # the harness's own recipes say so; a library's say which one and its version
    assert {i["library"] for i in listed if PRESETS[i["name"]].lib == "none"} == {"own"}


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_and_exit_2(cli_batch: dict, out_dir: Path, name: str) -> None:
    r = cli_batch[name]
    lines = r["stderr"].splitlines()
    assert r["rc"] == 2, r
    assert len(lines) == 1 and "Traceback" not in r["stderr"], r["stderr"]
    for frag in BAD[name][1]:
        assert frag in lines[0], (frag, lines[0])
    assert not (out_dir / name).exists()  # nothing was run


def test_bad_input_end_to_end_in_its_own_process() -> None:
    r = run_cli("run", "--strategy", "compute=fp16,scaler=static(-1)", "--scenario", "softmax_long")
    assert (r.rc, r.stderr) == (2, "error: loss scale must be a number from 2^-149 to 3.4e38 (FP32's range: the scale "
                                   "multiplies an FP32 loss), got -1\n")


# -- a small run, with a scenario that raises -------------------------------------------------------
BOOM = '''
import torch
from harness.core.scenario import Output, Scenario, register


def run(ex, inp, p):
    if p["k"] == 1 and ex.strategy.compute == "fp16":
        raise RuntimeError("a_cli_boom exploded on purpose")
    return Output(value=ex.act(inp["x"]).float())


register(Scenario(name="a_cli_boom", family="reduction", description="raises under fp16 for k=1",
                  grid={"k": [0, 1, 2]}, inputs=lambda p, g: {"x": torch.rand(8, generator=g)}, run=run))
'''


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    tmp = tmp_path_factory.mktemp("small")
    (tmp / "a_cli_boom.py").write_text(textwrap.dedent(BOOM))
    out = tmp / "run"
    r = run_cli("run", "--import", "a_cli_boom", "--scenario", "a_cli_boom", "--scenario", "softmax_long",
                "--strategy", "fp32", "--strategy", "fp16", "--seeds", "2", "--device", "cpu", "--quiet",
                "--out", str(out), pythonpath=tmp)
    return out, r


def test_run_writes_header_and_complete_records(small_run: tuple) -> None:
    out, r = small_run
    assert r.rc == 0, r.stderr
    header = json.loads((out / "run.json").read_text())
    recs = _records(out)
    assert header["status"] == "complete" and header["config"]["seeds"] == 2
    assert header["config"]["strategies"] == ["fp32", "fp16"] and header["config"]["imports"] == ["a_cli_boom"]
    assert header["environment"]["torch"] == torch.__version__ and header["environment"]["device"] == "cpu"
    assert len(recs) == header["expected_records"] == header["summary"]["records"]
    assert r.stdout.strip().splitlines()[-1].startswith(f"{len(recs)} records in ")
    for rec in recs:
        missing = set(RECORD_FIELDS) - set(rec)
        assert not missing, missing
        assert rec["device"] == "cpu" and rec["strategy_spec"] == str(PRESETS[rec["strategy"]])
        assert isinstance(rec["metrics"], dict) and rec["seconds"] >= 0
    boom = [x for x in recs if x["scenario"] == "a_cli_boom"]
    assert len(boom) == 3 * 2 * 2 and {x["seed"] for x in boom} == {0, 1}


def test_a_raising_scenario_becomes_an_error_record_and_the_run_goes_on(small_run: tuple) -> None:
    out, _ = small_run
    recs = _records(out)
    errors = [x for x in recs if x["outcome"] == "error"]
    assert [(x["params"], x["strategy"]) for x in errors] == [({"k": 1}, "fp16")] * 2  # one per seed
    for x in errors:
        assert x["reason"] == "RuntimeError: a_cli_boom exploded on purpose"
        assert "Traceback (most recent call last)" in x["traceback"] and "a_cli_boom.py" in x["traceback"]
    assert all(x["outcome"] != "error" for x in recs if x not in errors)
    assert sum(1 for x in recs if x["scenario"] == "softmax_long") == len(recs) - 12  # it ran after the errors


# -- the acceptance checks of the issue ---------------------------------------------------------------
def test_fp32_passes_every_case_of_the_quick_tier(quick_run: tuple) -> None:
    header, recs = quick_run
    recs = [r for r in recs if r["strategy"] == "fp32"]
    assert header["config"]["tier"] == "quick" and len(recs) == header["cases"] >= 19
    for r in recs:
        # a GPU-only scenario is not a case on the CPU: it is `unsupported` with its reason, never a failure
        ok = r["outcome"] == "pass" or (r["outcome"] == "unsupported" and "runs on cuda only" in r["reason"])
        assert ok, (r["case"], r["outcome"], r["reason"])


def test_fp16_underflows_below_2_pow_minus_24_where_scaling_and_bf16_pass(quick_run: tuple) -> None:
    # below 2^-24 FP16 flushes; the scalers start at 2^16, which lifts gradients above 2^-40 back into range
    reach = -24 - math.log2(PRESETS["fp16-dynamic"].scaler.init)
    assert PRESETS["fp16-gradscaler"].scaler.init == PRESETS["fp16-dynamic"].scaler.init and reach == -40
    recs = [r for r in quick_run[1] if r["scenario"] == "grad_magnitude_sweep" and r["strategy"] != "fp32"]
    tiny = [r for r in recs if r["params"]["log2_grad"] < -24]
    assert any(reach < r["params"]["log2_grad"] for r in tiny)  # the quick tier has cases scaling rescues
    for r in tiny:
        rescued = r["strategy"] == "bf16" or (r["strategy"] != "fp16" and r["params"]["log2_grad"] > reach)
        assert r["outcome"] == ("pass" if rescued else "underflow"), (r["case"], r["strategy"], r["reason"])
    fp16 = [r for r in tiny if r["strategy"] == "fp16"]
    assert all(r["metrics"]["grad_underflow_frac"] == 1.0 and "flushed to zero" in r["reason"] for r in fp16)


def test_fp16_overflows_on_a_loss_past_its_max(quick_run: tuple) -> None:
    recs = [r for r in quick_run[1] if r["scenario"] == "loss_past_fp16_max" and r["params"]["log2_loss"] >= 17]
    fp16 = [r for r in recs if r["strategy"] == "fp16"]
    assert fp16 and all(r["outcome"] == "overflow" and "65504" in r["reason"] for r in fp16)
    assert all(r["outcome"] == "pass" for r in recs if r["strategy"] == "bf16")


# -- exit codes: an internal fault is 3 with its traceback in a file, never 1 or 2 ------------------
class _Boom:
    def items(self):
        raise KeyError("injected")


def _faults(tmp: Path) -> dict:
    """command: (argv, module, attribute, replacement, exception name) - a fault injected inside each command."""
    from harness.results import num
    golden = ROOT / "tests" / "golden" / "cpu_small"
    base = tmp / "base.json"
    return {
        "list": (["list"], "harness.core.scenario", "discover", lambda *a, **k: 1 / 0, "ZeroDivisionError"),
        "strategies": (["strategies"], "harness.core.strategy", "PRESETS", _Boom(), "KeyError"),
        "run": (["run", *ONE, "--out", str(tmp / "new")], "harness.run.engine", "select_matrix",
                lambda *a, **k: [][1], "IndexError"),
        "report": (["report", str(golden)], "harness.report.summary.RunSummary", "add",
                   lambda self, r: {}["x"], "KeyError"),
        "gate": (["gate", str(golden), "--baseline", str(base)], "harness.gate", "as_case",
                 lambda b: (_ for _ in ()).throw(RuntimeError("injected")), "RuntimeError"),
        # a ValueError from inside a library (json), not raised on purpose for bad input: still 3
        "gate-library-valueerror": (["gate", str(golden), "--baseline", str(base)], "harness.gate", "as_case",
                                    lambda b: json.loads("{"), "JSONDecodeError"),
        # a ValueError of an operation in harness code (float('abc') in results.num), not a `raise`: still 3
        "gate-operation-valueerror": (["gate", str(golden), "--baseline", str(base)], "harness.gate", "as_case",
                                      lambda b: num("abc"), "ValueError"),
        "check-model": (["check-model", "nowhere:factory", "--device", "cpu"], "harness.models.model_check", "_cmd",
                        lambda args: 1 / 0, "ZeroDivisionError"),
    }


@pytest.mark.parametrize("name", ["list", "strategies", "run", "report", "gate", "gate-library-valueerror",
                                  "gate-operation-valueerror", "check-model"])
def test_an_internal_fault_exits_3_with_one_line_naming_the_traceback_file(name, tmp_path, monkeypatch, capsys):
    from harness.cli import main
    assert main(["gate", str(ROOT / "tests" / "golden" / "cpu_small"), "--baseline", str(tmp_path / "base.json"),
                 "--update"]) == 0
    argv, where, attr, fake, exc_name = _faults(tmp_path)[name]
    monkeypatch.setattr(f"{where}.{attr}", fake)
    monkeypatch.setenv("MP_HARNESS_CRASH_DIR", str(tmp_path))
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 3, err
    assert len(lines) == 1 and lines[0].startswith(f"internal error: {exc_name}: ") and "Traceback" not in err
    path = Path(re.search(r"traceback in (\S+);", lines[0]).group(1))
    assert path.parent == tmp_path and path.name.startswith("mp-harness-crash-")
    text = path.read_text()
    assert "Traceback (most recent call last)" in text and exc_name in text and f"python -m harness {argv[0]}" in text
    assert not (tmp_path / "new").exists()


def test_disk_full_exits_4_naming_the_path(tmp_path, monkeypatch, capsys):
    import errno
    import harness.gate
    from harness.cli import main

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(harness.gate, "write_baseline", full)
    rc = main(["gate", str(ROOT / "tests" / "golden" / "cpu_small"), "--baseline", str(tmp_path / "b.json"), "--update"])
    err = capsys.readouterr().err
    assert rc == 4 and err == (f"error: the system failed ({tmp_path / 'b.json'}): No space left on device; free "
                               "space or memory, then run again (an interrupted run completes with `run --resume DIR`)\n")


def test_bad_input_raised_on_purpose_is_still_2(tmp_path, capsys):
    from harness import exits
    from harness.cli import UsageError, main
    from harness.results import InputError, RunFileError
    assert issubclass(UsageError, InputError) and issubclass(RunFileError, InputError)
    assert main(["gate", str(tmp_path), "--baseline", str(tmp_path / "b.json")]) == 2
    assert exits.is_bad_input(InputError("x")) and not exits.is_bad_input(ZeroDivisionError())
    try:
        float("abc")  # raised by an operation in a test file, not by a `raise` in the harness
    except ValueError as exc:
        assert not exits.is_bad_input(exc)
