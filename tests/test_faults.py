"""Fault injection through the real CLI: scenarios that raise, hang, run out of memory, return garbage or
cannot build their inputs; interruption by SIGINT, SIGTERM and SIGKILL followed by ``--resume``; and
the determinism of records (bit-identical on the CPU; a nondeterministic FP32 reference is detected,
floors the bound, and is not gated on error growth).

The faulty scenarios live in throwaway modules passed with ``--import`` (PYTHONPATH = a temp dir), as a
user's would. docs/reliability.md lists every fault tried and what happened.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Iterator

import pytest
import torch

from conftest import ROOT, cli_env, read_jsonl, run_cli
from harness.run import reference
from harness.cli import main
from harness.run.engine import RunConfig, run_matrix
from harness.values.formats import FORMATS
from harness.gate import compare, make_baseline
from harness.results import read_run
from harness.core.scenario import REGISTRY, Output, Scenario
from harness.core.strategy import PRESETS
from harness.judge.tolerance import bound

#: Fields that measure time or memory, or stamp the clock: everything else of a record is determined
#: by the case, the strategy and the code.
TIMING_FIELDS = ("seconds", "peak_bytes", "created")


def strip_timing(rec: dict) -> dict:
    """A record without its timing fields (see :data:`TIMING_FIELDS`)."""
    return {k: v for k, v in rec.items() if k not in TIMING_FIELDS}


def by_pair(records: list[dict]) -> dict[tuple, dict]:
    """Records by (case, seed, strategy), refusing duplicates (a resumed run must not repeat a pair)."""
    out: dict[tuple, dict] = {}
    for r in records:
        key = (r["case"], r["seed"], r["strategy"])
        assert key not in out, f"duplicate record {key}"
        out[key] = strip_timing(r)
    return out


# -- faults inside a case ---------------------------------------------------------------------------
FAULTS = '''
import torch
from harness.core.scenario import Output, Scenario, register


def _x(p, g):
    return {"x": torch.rand(8, generator=g) + 0.5}


def _faulty(fault):
    def run(ex, inp, p):
        if ex.strategy.compute != "fp16" or p["k"] != 1:  # FP32 (the reference) and k = 0, 2 are healthy
            return Output(value=ex.act(inp["x"]).float())
        if fault == "raise":
            raise RuntimeError("f_raise exploded on purpose")
        if fault == "hang":
            x = inp["x"]
            while True:  # busy in torch ops, as a diverging iterative solver would be
                x = x * 1.0
        if fault == "memerr":
            raise MemoryError("f_memerr: the host is full")
        if fault == "absurd":
            return Output(value=torch.empty(2**62))  # 2^64 bytes: more than any address space
        if fault == "toobig":
            return Output(value=torch.empty(2**48))  # 1 PiB: past the 128 TiB of user address space
        if fault == "shape":
            return Output(value=torch.ones(3))
        if fault == "notoutput":
            return {"value": inp["x"]}
        if fault == "exit":
            raise SystemExit(3)
    return run


for fault in ("raise", "hang", "memerr", "absurd", "toobig", "shape", "notoutput", "exit"):
    register(Scenario(name=f"f_{fault}", family="reduction", description=f"fault: {fault} under fp16 for k=1",
                      grid={"k": [0, 1, 2]}, inputs=_x, run=_faulty(fault)))


def _no_inputs(p, g):
    raise KeyError("f_inputs cannot build its inputs")


register(Scenario(name="f_inputs", family="reduction", description="inputs() raises", grid={"k": [0]},
                  inputs=_no_inputs, run=lambda ex, i, p: Output()))
'''

#: fault -> (the start of the error reason, a line the record's traceback must show)
EXPECTED = {
    "raise": ("RuntimeError: f_raise exploded on purpose", 'raise RuntimeError("f_raise exploded on purpose")'),
    "hang": ("CaseTimeout: case exceeded its 1 s timeout", "f_faults.py\", line 1"),  # stopped inside the loop
    "memerr": ("out of memory: MemoryError: f_memerr: the host is full", "raise MemoryError"),
    "absurd": ("RuntimeError: Storage size calculation overflowed", "torch.empty(2**62)"),
    "toobig": ("out of memory: RuntimeError: ", "torch.empty(2**48)"),
    "shape": ("ValueError: candidate shape (3,) differs from the reference's (8,)", "tensor_metrics"),
    "notoutput": ("TypeError: scenario f_notoutput.run returned dict, expected harness.Output", "TypeError"),
    "exit": ("SystemExit: 3", "raise SystemExit(3)"),
}


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, dict, list[dict]]:
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "f_faults.py").write_text(FAULTS)
    out = tmp / "run"
    res = run_cli("run", "--import", "f_faults", "--scenario", "f_*", "--strategy", "fp32", "--strategy", "fp16",
                  "--device", "cpu", "--timeout", "1", "--quiet", "--out", str(out), pythonpath=tmp)
    return out, res, json.loads((out / "run.json").read_text()), read_jsonl(out / "records.jsonl")


@pytest.mark.parametrize("fault", list(EXPECTED))
def test_a_fault_is_an_error_record_with_reason_and_traceback(fault_run, fault: str) -> None:
    _, res, _, records = fault_run
    assert res.rc == 0, res.stderr
    got = {(r["case"], r["strategy"]): r for r in records}
    bad = got[(f"f_{fault}[k=1]", "fp16")]
    reason, tb_line = EXPECTED[fault]
    assert bad["outcome"] == "error" and bad["reason"].startswith(reason), bad["reason"]
    assert bad["traceback"].startswith("Traceback (most recent call last)") and tb_line in bad["traceback"]
    assert bad["metrics"] == {}
    # the run went on: the same case under FP32, and the next case under fp16, were judged normally
    assert got[(f"f_{fault}[k=1]", "fp32")]["outcome"] == "pass"
    assert got[(f"f_{fault}[k=2]", "fp16")]["outcome"] == "pass"


def test_the_timeout_stops_the_hang_after_about_one_second(fault_run) -> None:
    hang = next(r for r in fault_run[3] if r["case"] == "f_hang[k=1]" and r["strategy"] == "fp16")
    assert 1.0 <= hang["seconds"] < 2.0


def test_inputs_that_raise_are_an_error_for_every_strategy(fault_run) -> None:
    recs = [r for r in fault_run[3] if r["scenario"] == "f_inputs"]
    assert sorted(r["strategy"] for r in recs) == ["fp16", "fp32"]
    for r in recs:
        assert r["outcome"] == "error"
        assert r["reason"] == "building inputs failed: KeyError: 'f_inputs cannot build its inputs'"
        assert 'raise KeyError("f_inputs cannot build its inputs")' in r["traceback"]


def test_the_run_completes_and_the_summary_counts_the_errors(fault_run) -> None:
    out, res, header, records = fault_run
    assert res.rc == 0 and res.stderr == ""
    assert header["status"] == "complete"
    # 8 faulty scenarios x 3 cases + f_inputs x 1 case, each under 2 strategies: nothing lost to a fault
    assert header["expected_records"] == len(records) == 50
    s = header["summary"]
    assert s["by_strategy"]["fp16"] == {"pass": 16, "error": 9}  # 8 faults at k=1, and f_inputs
    assert s["by_strategy"]["fp32"] == {"pass": 24, "error": 1}  # f_inputs only
    assert s["by_family"]["reduction"]["fp16"]["error"] == 9
    assert "50 records in" in res.stdout


def test_the_gate_fails_a_case_that_passed_in_the_baseline_and_errors_now(fault_run, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    out, _, _, records = fault_run
    base_path = tmp_path / "base.json"
    assert main(["gate", str(out), "--baseline", str(base_path), "--update"]) == 0
    assert main(["gate", str(out), "--baseline", str(base_path)]) == 0  # a run against itself passes
    base = json.loads(base_path.read_text())
    for key in ("f_raise[k=1]#0|fp16", "f_hang[k=1]#0|fp16"):  # the baseline saw these pass
        assert base["cases"][key]["outcome"] == "error"
        base["cases"][key]["outcome"] = "pass"
    base_path.write_text(json.dumps(base))
    capsys.readouterr()
    assert main(["gate", str(out), "--baseline", str(base_path)]) == 1
    text = capsys.readouterr().out
    assert "outcome  f_raise[k=1]#0|fp16: pass -> error: RuntimeError: f_raise exploded on purpose" in text
    assert "outcome  f_hang[k=1]#0|fp16: pass -> error: CaseTimeout" in text
    assert "gate FAIL: 2 regressions" in text


# -- interruption -----------------------------------------------------------------------------------
SLOW = '''
import time
import torch
from harness.core.scenario import Output, Scenario, register


def run(ex, inp, p):
    time.sleep(0.01)
    return Output(value=(ex.act(inp["x"]) * p["k"]).float().cumsum(0))


register(Scenario(name="i_slow", family="reduction", description="a slow cumulative sum", grid={"k": list(range(1, 13))},
                  inputs=lambda p, g: {"x": torch.randn(256, generator=g)}, run=run, n=lambda p: 256))
'''
INTERRUPT_ARGS = ("--import", "i_slow", "--scenario", "i_slow", "--strategy", "fp32", "--strategy", "fp16",
                  "--strategy", "bf16", "--seeds", "2", "--device", "cpu", "--quiet")
TOTAL = 12 * 2 * 3


@pytest.fixture(scope="module")
def slow_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory holding the ``i_slow`` module, importable here too; unregistered afterwards."""
    tmp = tmp_path_factory.mktemp("slow")
    (tmp / "i_slow.py").write_text(SLOW)
    sys.path.insert(0, str(tmp))
    yield tmp
    sys.path.remove(str(tmp))
    sys.modules.pop("i_slow", None)
    REGISTRY.remove("i_slow")


@pytest.fixture(scope="module")
def whole_run(slow_module: Path) -> dict[tuple, dict]:
    """The uninterrupted run (in this process: the interrupted ones run in their own)."""
    out = slow_module / "whole"
    assert main(["run", *INTERRUPT_ARGS, "--out", str(out)]) == 0
    return by_pair(read_jsonl(out / "records.jsonl"))


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_records(slow_module: Path, whole_run: dict,
                                                                        sig: signal.Signals) -> None:
    out = slow_module / f"cut-{sig.name}"
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", *INTERRUPT_ARGS, "--out", str(out)], cwd=ROOT,
                            env=cli_env(slow_module), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while _lines(out / "records.jsonl") < 12 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 130, signal.SIGKILL: -9}[sig], err
    header = json.loads((out / "run.json").read_text())  # whole JSON, never half a file
    assert header["status"] == ("running" if sig == signal.SIGKILL else "interrupted")
    if sig != signal.SIGKILL:
        assert err == "interrupted: records written so far are kept\n"
    else:  # SIGKILL may land in the middle of a write: leave the last line torn as it then would be
        data = (out / "records.jsonl").read_bytes()
        last = data.rstrip(b"\n").rfind(b"\n") + 1
        (out / "records.jsonl").write_bytes(data[:last + (len(data) - last) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, kept = read_run(out)
    torn = [str(w.message) for w in caught]
    assert torn == ([f"{out / 'records.jsonl'}:{len(kept) + 1}: skipping a torn or corrupted record line"]
                    if sig == signal.SIGKILL else [])
    assert 11 <= len(kept) < TOTAL
    for r in kept:  # what was written before the interruption is what an uninterrupted run writes
        assert strip_timing(r) == whole_run[(r["case"], r["seed"], r["strategy"])]

    assert main(["run", "--resume", str(out)]) == 0
    final = json.loads((out / "run.json").read_text())
    assert final["status"] == "complete" and final["summary"]["records_this_session"] == TOTAL - len(kept)
    assert by_pair(read_jsonl(out / "records.jsonl")) == whole_run


# -- determinism --------------------------------------------------------------------------------------
def test_the_same_seed_gives_bit_identical_records_on_the_cpu(tmp_path: Path) -> None:
    """One run in a child interpreter, one in this one (other hash seeds, other history): same bits."""
    args = ["run", "--scenario", "softmax_long", "--scenario", "grad_magnitude_sweep", "--scenario", "update_swamping",
            "--strategy", "fp16-dynamic", "--strategy", "bf16", "--strategy", "fp8-tensorwise", "--seeds", "2",
            "--device", "cpu", "--quiet"]
    assert run_cli(*args, "--out", str(tmp_path / "a")).rc == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    # records are appended as cases finish (in the order the workers finish them): compare case by case
    runs = [sorted(read_jsonl(tmp_path / name / "records.jsonl"), key=lambda r: (r["case"], r["seed"], r["strategy"]))
            for name in "ab"]
    assert len(runs[0]) == len(runs[1]) > 20
    assert {r["outcome"] for r in runs[0]} > {"pass"}  # failures are reproduced too, not only passes
    for a, b in zip(*runs):  # same bits: json floats print every bit of the double
        assert json.dumps(strip_timing(a), sort_keys=True) == json.dumps(strip_timing(b), sort_keys=True)


NOISY = {"on": False, "calls": 0}
#: Relative noise of successive FP32 runs while NOISY is on: reference, its rerun, the FP32 strategy.
NOISE = (0.0, 1e-5, 0.5e-5)


def _noisy_run(ex, inp, p) -> Output:
    """A sum whose FP32 result depends on hidden state that no seed resets (as the order of atomic adds
    on a GPU does) while ``NOISY['on']``: successive FP32 runs carry the relative noise of :data:`NOISE`,
    so the rerun spread is 1e-5 and the FP32 strategy's error 5e-6, both above FP32's own bound."""
    x = ex.act(inp["x"])
    y = x.sum(dim=-1, keepdim=True) * torch.ones(1, 4, dtype=x.dtype)
    if NOISY["on"] and ex.dtype == torch.float32:
        y = y * (1 + NOISE[NOISY["calls"] % len(NOISE)])
        NOISY["calls"] += 1
    return Output(value=y.float())


@pytest.fixture
def noisy(temp_scenarios: list, monkeypatch: pytest.MonkeyPatch) -> Scenario:
    """A scenario whose FP32 run is nondeterministic, with the reference's rerun armed on the CPU."""
    from conftest import add_scenario
    monkeypatch.setattr(reference, "RERUN_DEVICES", ("cpu", "cuda"))
    monkeypatch.setitem(NOISY, "on", True)
    monkeypatch.setitem(NOISY, "calls", 0)
    return add_scenario(temp_scenarios, Scenario(
        name="t_noisy_sum", family="reduction", description="FP32 noise from hidden state",
        grid={"k": [0, 1]}, inputs=lambda p, g: {"x": torch.rand(8, 64, generator=g) + 0.5},
        run=_noisy_run, n=lambda p: 64))


def _run(tmp: Path, s: Scenario, name: str) -> list[dict]:
    cfg = RunConfig([s], [PRESETS["fp32"], PRESETS["bf16"]], torch.device("cpu"), out=tmp / name)
    out, _, _ = run_matrix(cfg)
    return read_run(out)[1]


def test_a_nondeterministic_reference_is_marked_with_its_spread_and_floors_the_bound(noisy, tmp_path: Path) -> None:
    recs = _run(tmp_path, noisy, "n")
    assert len(recs) == 4
    for r in recs:
        assert r["reference"]["nondeterministic"] is True
        assert r["reference"]["fp32_rerun_diff"] == pytest.approx(1e-5, rel=0.05)
    for r in (r for r in recs if r["strategy"] == "fp32"):
        # 5e-6 is above FP32's bound for n=64 (2.1e-6): without the floor this would be `diverged`
        assert r["metrics"]["rel_err"] == pytest.approx(5e-6, rel=0.05)
        assert r["bound"] == 2 * r["reference"]["fp32_rerun_diff"]  # engine.SPREAD_FACTOR spreads
        assert r["outcome"] == "pass", r["reason"]
    assert {r["outcome"] for r in recs if r["strategy"] == "bf16"} == {"pass"}


def test_without_the_rerun_the_same_noise_fails_fp32(noisy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference, "RERUN_DEVICES", ("cuda",))  # the CPU default: one FP32 run
    monkeypatch.setattr(sys.modules[__name__], "NOISE", (0.0, 1e-5))  # reference, then the FP32 strategy
    recs = _run(tmp_path, noisy, "o")
    assert all("nondeterministic" not in r["reference"] for r in recs)
    fp32 = [r for r in recs if r["strategy"] == "fp32"]
    assert [r["outcome"] for r in fp32] == ["diverged", "diverged"], [r["reason"] for r in fp32]


def test_a_deterministic_reference_is_marked_so_and_keeps_its_bound(noisy, tmp_path: Path) -> None:
    NOISY["on"] = False
    recs = _run(tmp_path, noisy, "d")
    assert {(r["reference"]["nondeterministic"], r["reference"]["fp32_rerun_diff"]) for r in recs} == {(False, 0.0)}
    fp32_bound = bound(FORMATS["fp32"], 64)  # 2.1e-6: no floor raised it
    assert all(r["metrics"]["rel_err"] == 0 and r["bound"] == fp32_bound for r in recs if r["strategy"] == "fp32")


def test_the_floor_names_its_source_and_ignores_an_infinite_spread() -> None:
    from harness.run.engine import _floor

    class R:
        format, check = "fp32", {"fp32_vs_fp64": 1e-7, "nondeterministic": True, "fp32_rerun_diff": 3e-3}
    assert _floor(R) == {"floor": 6e-3, "floor_source":
                         "2 x the FP32 reference's own run-to-run spread 3.00e-03 (nondeterministic)"}
    R.check = {"fp32_vs_fp64": 1e-7, "nondeterministic": False, "fp32_rerun_diff": 0.0}
    assert _floor(R) == {"floor": 0.0}
    R.format = "fp64"
    assert _floor(R) == {"floor": 1e-7}  # deterministic: FP32's own error against FP64 alone
    # FP64 reference and a noisy FP32: a fresh FP32 run is within |r' - r32| + |r32 - r64| of FP64 (the
    # case that flagged FP32 itself as diverged on the H200: 4.47e-2 against FP32-vs-FP64's 4.32e-2)
    R.check = {"fp32_vs_fp64": 4.32e-2, "nondeterministic": True, "fp32_rerun_diff": 3.57e-2}
    got = _floor(R)
    assert got["floor"] == pytest.approx(4.32e-2 + 2 * 3.57e-2) and got["floor"] > 4.47e-2
    assert got["floor_source"].startswith("FP32's own error against FP64 4.32e-02 (the reference here) + 2 x")
    R.check = {"fp32_vs_fp64": 1e-7, "nondeterministic": True, "fp32_rerun_diff": float("inf")}
    assert _floor(R) == {"floor": 1e-7}  # an inf spread is no floor: it would pass everything


def test_the_gate_notes_but_does_not_gate_error_growth_of_nondeterministic_cases(noisy, tmp_path: Path) -> None:
    recs = _run(tmp_path, noisy, "g")
    header = read_run(tmp_path / "g")[0]
    base = make_baseline(header, recs)
    key = "t_noisy_sum[k=0]#0|bf16"
    assert base["cases"][key]["nondeterministic"] is True
    grown = [dict(r, metrics=dict(r["metrics"], rel_err=r["metrics"]["rel_err"] * 1000)) for r in recs]
    res = compare(base, header, grown)
    assert res.regressions == []
    notes = [f for f in res.notices if f.key == key]
    assert len(notes) == 1 and notes[0].message.startswith(
        "errors not compared: the FP32 reference was nondeterministic in this run (rerun spread ")
    # an outcome change still counts
    worse = [dict(r, outcome="diverged") if r["strategy"] == "bf16" and r["case"] == "t_noisy_sum[k=0]" else r
             for r in recs]
    assert [f.key for f in compare(base, header, worse).regressions if f.rule == "outcome"] == [key]
    # a deterministic baseline case against a run marked nondeterministic: not compared either
    del base["cases"][key]["nondeterministic"]
    assert compare(base, header, grown).regressions == []
    # and with neither marked, the same growth is a regression
    plain = [dict(r, reference=dict(r["reference"], nondeterministic=False)) for r in grown]
    assert key in {f.key for f in compare(base, header, plain).regressions if f.rule == "error"}


# -- scale --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_peak_memory_stays_flat_as_the_case_count_triples() -> None:
    """bench/scale.py on 2,000 and 6,000 cases of a trivial scenario (one strategy): records are streamed,
    so 4,000 more cases may add well under 4 MiB of peak RSS (measured: about 0.2 MiB per 1,000 cases)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import scale
    finally:
        sys.path.remove(str(ROOT / "bench"))
    res = scale.scale([2000, 6000], ["fp32"])
    small, large = res["rows"]
    assert (small["records"], large["records"]) == (2000, 6000)
    assert large["records_mib"] > 2.5 * small["records_mib"]  # the data grew threefold; the memory did not
    assert large["peak_rss_mib"] - small["peak_rss_mib"] < 4.0, res


# -- the rerun of a training reference, cut short where its first updates reproduce ------------------------
RUNS = {"noise": 0.0}


def _counting_model(noise: bool):
    def factory() -> dict:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        x = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))

        def loss(m, b):
            out = m(b[0]).pow(2).mean()
            if out.dtype == torch.float32 and noise:  # every FP32 run adds in another order, as atomics do
                RUNS["noise"] += 1e-6
                out = out * (1 + RUNS["noise"])
            return out
        return {"model": model, "batch": lambda i: (x * (1 + 0.1 * i),), "loss": loss,
                "optimizer": lambda ps: torch.optim.SGD(ps, lr=0.05)}
    return factory


def _rerun_records(tmp: Path, monkeypatch: pytest.MonkeyPatch, noise: bool, probe: int) -> list[dict]:
    from harness.models.user_model import load_spec, model_scenario
    monkeypatch.setattr(reference, "RERUN_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(reference, "RERUN_PROBE_STEPS", probe)
    s = model_scenario(load_spec(_counting_model(noise), name="rerun_probe"), 12)
    out, _, _ = run_matrix(RunConfig([s], [PRESETS["fp32"], PRESETS["bf16"]], torch.device("cpu"),
                                     out=tmp / f"r{noise}{probe}", workers=0))
    return read_run(out)[1]


def test_a_training_reference_that_reproduces_its_first_updates_skips_the_rest_of_its_rerun(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short = _rerun_records(tmp_path, monkeypatch, noise=False, probe=4)
    full = _rerun_records(tmp_path, monkeypatch, noise=False, probe=10 ** 9)  # the rerun in full, as before
    for a, b in zip(short, full):
        ref_a, ref_b = dict(a.pop("reference")), dict(b.pop("reference"))
        assert ref_a.pop("fp32_rerun").startswith("the first 4 of 12 updates ran again and came out bit for bit")
        assert "fp32_rerun" not in ref_b and ref_a == ref_b  # nondeterministic False, spread 0 either way
        a.pop("seconds"), b.pop("seconds")
        assert a == b  # the same verdict, metrics and bound


def test_a_training_reference_whose_first_updates_differ_reruns_in_full(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    recs = _rerun_records(tmp_path, monkeypatch, noise=True, probe=4)
    for r in recs:
        assert r["reference"]["nondeterministic"] is True and "fp32_rerun" not in r["reference"]
        assert r["reference"]["fp32_rerun_diff"] > 0  # measured by the full rerun, at the horizon judged
