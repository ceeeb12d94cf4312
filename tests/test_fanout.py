"""The runs of one case at once (harness.run.fanout): the same records as one after another, apart from
timings, whatever goes wrong in a helper.

The serial run is the oracle: every test runs the same matrix with ``fanout=1`` and with helpers, and
compares the records with :func:`bench.same_records.compare`. The faults are made to happen in a helper
only (a helper's parent is the worker, whose parent is this process), each one leaves a marker file, and
the test checks the marker, so a fault that never reached a helper cannot pass unnoticed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bench.same_records import compare
from harness.core.execution import Execution
from harness.core.scenario import Case, Output, Scenario, discover
from harness.core.strategy import PRESETS, resolve
from harness.run.engine import RunConfig, case_inputs, run_matrix
from harness.run.fanout import Failed, Helpers, default_fanout
from harness.run.reference import ReferenceCache, reference_keys

TEST_PROCESS = os.getpid()


def _in_helper() -> bool:
    return os.getppid() != TEST_PROCESS and os.getpid() != TEST_PROCESS


@pytest.fixture
def one_thread():
    """Every process computes with one thread, with helpers or without (torch splits FP32 sums by it)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _run(tmp_path: Path, name: str, scenarios: list, strategies: list[str], fanout: int, tier: str = "quick") -> Path:
    out = tmp_path / name
    run_matrix(RunConfig(scenarios, resolve(strategies), torch.device("cpu"), tier=tier, out=out, workers=1,
                         fanout=fanout))
    return out


def _records(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "records.jsonl").read_text().splitlines() if x.strip()]


def test_a_training_and_a_reduction_give_the_records_of_one_run_after_another(tmp_path: Path, one_thread) -> None:
    """Training cases (a reference of FP32, FP64 and three perturbed runs, then every strategy's training)
    and a reduction whose reference is FP64: bit for bit the serial run's records."""
    scenarios = discover().select(["train_mlp", "softmax_long"], [])
    strategies = ["fp32", "fp16-dynamic", "bf16-pure", "fp8-tensorwise"]
    serial = _run(tmp_path, "serial", scenarios, strategies, 1)
    fanned = _run(tmp_path, "fanned", scenarios, strategies, 3)
    assert compare(serial, fanned) == []
    recs = _records(fanned)
    assert {r["outcome"] for r in recs} >= {"pass"} and len(recs) == len(_records(serial)) > 8
    assert any(r["outcome"] != "pass" for r in recs)  # bf16-pure loses updates: not only passes compared
    header = json.loads((fanned / "run.json").read_text())
    assert header["summary"]["references_computed"] == json.loads((serial / "run.json").read_text())["summary"][
        "references_computed"]


def _x(p: dict, g: torch.Generator) -> dict:
    return {"x": torch.rand(64, generator=g) + 0.5}


def _faulty(fault: str, marker: Path):
    """A sum whose runs in a helper fail as ``fault`` says (every run there: the reference's and the
    strategies'); in the worker they are healthy."""
    def run(ex, inp, p):
        if _in_helper():
            with marker.open("a") as f:
                f.write(fault + "\n")
            if fault == "oom":
                raise MemoryError("simulated: no memory left beside the other runs")
            if fault == "die":
                os._exit(7)  # as the OOM killer: the helper is gone
            if fault == "raise" and ex.strategy.compute == "fp64":
                raise ValueError("simulated: the FP64 reference run fails in a helper")
        return Output(value=ex.act(inp["x"]).float().sum().reshape(1))
    return run


@pytest.mark.parametrize("fault", ["oom", "die", "raise"])
def test_a_run_lost_in_a_helper_runs_again_in_the_worker(tmp_path: Path, one_thread, fault: str, capfd) -> None:
    """Out of memory beside the other runs, a helper killed, a reference run raising there: the run goes
    back to the worker, alone, and the records are the serial run's."""
    marker = tmp_path / "fired"
    s = Scenario(name=f"fan_{fault}", family="reduction", description="a sum", grid={"k": [0, 1, 2]},
                 inputs=_x, run=_faulty(fault, marker), n=lambda p: 64)
    strategies = ["fp32", "fp16", "bf16", "fp16-pure"]
    serial = _run(tmp_path, "serial", [s], strategies, 1)
    assert not marker.exists()
    fanned = _run(tmp_path, "fanned", [s], strategies, 3)
    fired = marker.read_text().split()
    assert set(fired) == {fault}  # the fault did happen in a helper
    assert "runs again in the worker" in capfd.readouterr().err
    if fault in ("oom", "die"):  # the case's other runs then stay in the worker: at most the three in flight
        assert len(fired) <= 3 * 3  # (of six runs a case, three cases) met a helper
    assert compare(serial, fanned) == []
    assert {r["outcome"] for r in _records(fanned)} == {"pass"}


def _raising(ex, inp, p):
    if ex.strategy.compute == "fp16":
        raise ValueError(f"fp16 refuses k={p['k']}")
    return Output(value=ex.act(inp["x"]).float().sum().reshape(1))


def test_a_strategy_that_raises_in_a_helper_is_the_error_record_it_is_alone(tmp_path: Path) -> None:
    """The helper makes the verdict and keeps the traceback, as the worker would."""
    s = Scenario(name="fan_raising", family="reduction", description="a sum", grid={"k": [0]}, inputs=_x,
                 run=_raising, n=lambda p: 64)
    case = Case(s, {"k": 0}, 0)
    dev = torch.device("cpu")
    fp16 = PRESETS["fp16"]
    helpers = Helpers(1, {s.name: s}, {fp16.label: fp16}, dev, 60.0)
    try:
        assert helpers.size == 1
        inputs, exc = case_inputs(case, dev)
        assert exc is None
        helpers.begin(case, inputs, [], [fp16.label])
        helpers._receive(30.0)  # the only job went to the helper at once
        got = helpers.strategy(fp16)
        assert isinstance(got, Failed)
        assert got.verdict.outcome == "error" and got.verdict.reason == "ValueError: fp16 refuses k=0"
        assert "fp16 refuses k=0" in got.traceback and "_raising" in got.traceback
    finally:
        helpers.close()
    serial = _run(tmp_path, "serial", [s], ["fp32", "fp16"], 1)
    fanned = _run(tmp_path, "fanned", [s], ["fp32", "fp16"], 2)
    diffs = compare(serial, fanned)  # the traceback's outer frames are the helper's, not the worker's
    assert len(diffs) <= 1 and all(d.startswith("records/fan_raising[k=0] fp16/traceback:") for d in diffs)
    rec, alone = (next(r for r in _records(d) if r["strategy"] == "fp16") for d in (fanned, serial))
    assert rec["outcome"] == "error" and rec["reason"] == alone["reason"] == "ValueError: fp16 refuses k=0"
    assert rec["traceback"].splitlines()[-3:] == alone["traceback"].splitlines()[-3:]  # the scenario's frame


def test_reference_keys_name_every_run_the_reference_makes() -> None:
    """On CUDA a training reference adds three perturbed runs and a 4-update rerun; a reduction a full
    rerun; on the CPU neither reruns."""
    reg = discover()
    train = Case(reg.get("train_mlp"), reg.get("train_mlp").params("quick")[0], 0)
    red = Case(reg.get("softmax_long"), reg.get("softmax_long").params("quick")[0], 0)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert reference_keys(train, cpu) == [(False, None, None, 0), (True, None, None, 0)] + [
        (False, k, None, 0) for k in range(3)]
    probe = reference_keys(train, cuda)[-1]
    assert dict(probe[2])["steps"] == 4 and dict(probe[2])["lr"] == train.params["lr"]
    assert reference_keys(red, cuda) == [(False, None, None, 0), (True, None, None, 0), (False, None, None, 1)]
    refs = ReferenceCache()
    assert refs.computes(red, cpu)


def test_helpers_are_not_forked_once_cuda_started(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A process that started CUDA cannot fork one that uses it: every run then stays in the worker, and
    a line says so."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    h = Helpers(3, {}, {}, torch.device("cpu"), None)
    assert h.size == 0
    assert "one at a time, not 3 at once" in capsys.readouterr().err
    h.close()


def test_default_fanout_is_one_on_the_cpu() -> None:
    assert default_fanout(torch.device("cpu")) == 1
    assert 1 <= default_fanout(torch.device("cuda")) <= 4


def test_parallel_out_of_range_is_one_line_and_exit_2(capsys) -> None:
    from harness.cli import main
    assert main(["check-model", "zoo:gpt2", "--parallel", "0"]) == 2
    err = capsys.readouterr().err
    assert "--parallel" in err and "must be" in err and "Traceback" not in err
    assert main(["zoo", "--parallel", "99"]) == 2
    assert "must be 1 to 16" in capsys.readouterr().err


def test_check_model_with_helpers_writes_the_records_of_one_run_after_another(tmp_path: Path, one_thread) -> None:
    """check-model's one case with its trainings at once: the same records and diagnosis."""
    from harness.models.model_check import check_model
    kw = dict(strategies=["fp32", "fp16", "bf16-pure"], steps=6, device="cpu", cache=False, diagnose=True)
    a = check_model("examples.third_party_model:factory", out=tmp_path / "a", parallel=1, **kw)
    b = check_model("examples.third_party_model:factory", out=tmp_path / "b", parallel=3, **kw)
    assert compare(a.out, b.out) == []
    assert a.recommendation == b.recommendation
    isolation = [json.loads((r.out / "run.json").read_text())["summary"]["isolation"] for r in (a, b)]
    assert "at once" not in isolation[0] and "each runs up to 3 of a case's runs at once" in isolation[1]
    bookkeeping = [json.loads((r.out / "run.json").read_text())["summary"]["bookkeeping_ms_per_record"] for r in (a, b)]
    assert bookkeeping[0] is not None and bookkeeping[1] is None  # overlapping runs: not measurable


def test_ran_crosses_processes_exactly() -> None:
    """What a helper sends back (an Output inside a Ran, a trace inside it) arrives bit for bit."""
    from harness.run.fanout import _to
    from harness.run.engine import Ran
    from harness.core.scaling import ScaleTrace
    g = torch.Generator().manual_seed(3)
    out = Output(value=torch.randn(5, generator=g, dtype=torch.float64) * 1e-30, grads={"w": torch.randn(2, 2, generator=g)},
                 losses=[1.5, float("nan")], trace=ScaleTrace("s", [2.0], [False], [False], ["hold"]),
                 extra={"zeros": torch.tensor([True, False]), "nested": [torch.ones(1)]})
    ran = Ran(out, 0.1, None, ["note"], "fp16")
    back = _to("cpu", ran)
    assert back is not ran and back.out is not out
    assert torch.equal(back.out.value, out.value) and back.out.value.dtype == torch.float64
    assert torch.equal(back.out.grads["w"], out.grads["w"]) and back.out.trace == out.trace
    assert back.out.losses[0] == 1.5 and back.out.losses[1] != back.out.losses[1]
    assert torch.equal(back.out.extra["zeros"], out.extra["zeros"]) and back.judged_format == "fp16"
    assert Execution(PRESETS["fp16"], "cpu").judged_format.name == "fp16"


def _slow_fp16(ex, inp, p):
    if ex.strategy.compute == "fp16":
        import time
        if _in_helper():
            (Path(inp["marker"]) / str(os.getpid())).write_text("slow in a helper")
        time.sleep(30)
    return Output(value=ex.act(inp["x"]).float().sum().reshape(1))


def test_a_run_past_its_deadline_in_a_helper_is_the_timeout_record_it_is_alone(tmp_path: Path) -> None:
    """The helper's own deadline ends the run; the record is the serial run's (the traceback's frames aside)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    s = Scenario(name="fan_slow", family="reduction", description="a sum", grid={"k": [0]},
                 inputs=lambda p, g: {**_x(p, g), "marker": str(marks)}, run=_slow_fp16, n=lambda p: 64)
    outs = []
    for fanout in (1, 3):
        out = tmp_path / f"f{fanout}"
        run_matrix(RunConfig([s], resolve(["fp32", "fp16", "bf16"]), torch.device("cpu"), out=out, workers=1,
                             fanout=fanout, timeout=3.0))  # room for the other runs on a busy machine
        outs.append({r["strategy"]: r for r in _records(out)})
    for alone, fanned in zip(*(sorted(o.items()) for o in outs)):
        assert (alone[1]["outcome"], alone[1]["reason"]) == (fanned[1]["outcome"], fanned[1]["reason"]), fanned[1]
    assert outs[1]["fp16"]["reason"] == "CaseTimeout: case exceeded its 3 s timeout"
    assert len(list(marks.iterdir())) == 1  # the slow run was a helper's (its deadline, not the worker's)
    assert outs[1]["bf16"]["outcome"] == outs[1]["fp32"]["outcome"] == "pass"


def test_fanout_is_set_by_keyword_only_and_within_range() -> None:
    """A call passing RunConfig's fields by position (the CLI's does) cannot reach ``fanout``: a field
    inserted before ``max_records`` once turned the CLI's limit of a million records into as many helpers."""
    scen, strats, dev = discover().select(["softmax_long"], []), resolve(["fp32"]), torch.device("cpu")
    cfg = RunConfig(scen, strats, dev, 1, "quick", None, [], 600.0, 1, 1_000_000)
    assert cfg.fanout == 1 and cfg.max_records == 1_000_000
    for bad in (0, 17):
        with pytest.raises(ValueError, match="fanout must be 1 to 16"):
            RunConfig(scen, strats, dev, fanout=bad)
    with pytest.raises(ValueError, match="at most 16 at once"):
        Helpers(17, {}, {}, dev, None)


def test_a_helpers_message_is_read_back_without_unpickling_code() -> None:
    """Plain containers through ``torch.load(weights_only=True)``: a Ran comes back bit for bit; anything
    else (a numpy scalar in extra, a class outside the list) makes the run lost, done again in the worker."""
    import numpy as np
    from harness.core.scaling import ScaleTrace
    from harness.judge.verdict import Verdict
    from harness.run.engine import Ran
    from harness.run.fanout import _Lost, _pack, _unpack
    g = torch.Generator().manual_seed(5)
    out = Output(value=torch.randn(4, generator=g), grads={"a.w": torch.randn(3, generator=g, dtype=torch.float64)},
                 losses=[0.5, float("inf")], trace=ScaleTrace("dyn", [65536.0], [True], [True], ["backoff"]),
                 extra={"updates": 3, "stopped": None, "pair": (1, 2)})
    ran = Ran(out, 0.25, 1024, ["emulated"], "bf16", Verdict("unsupported", "why"), {"models": 1})
    job, back = _unpack(_pack(7, ran), 0)
    assert job == 7 and isinstance(back, Ran) and isinstance(back.out, Output) and back.early == ran.early
    assert torch.equal(back.out.value, out.value) and back.out.grads["a.w"].dtype == torch.float64
    assert back.out.trace == out.trace and back.out.losses == out.losses and back.out.extra == out.extra
    assert (back.inner, back.peak_bytes, back.emulated, back.judged_format, back.compile) == (
        0.25, 1024, ["emulated"], "bf16", {"models": 1})
    out.extra["np"] = np.float64(1.5)
    job, lost = _unpack(_pack(8, ran), 8)
    assert job == 8 and isinstance(lost, _Lost) and "could not be read back safely" in lost.why
    job, lost = _unpack(_pack(9, {"__dataclass__": "Popen", "args": "rm"}), 9)
    assert isinstance(lost, _Lost) and "KeyError" in lost.why


def _timed(where: Path):
    def run(ex, inp, p):
        import time
        t0 = time.time()
        time.sleep(0.5)
        (where / f"{os.getpid()}-{t0}").write_text(f"{t0} {time.time()}")
        return Output(value=ex.act(inp["x"]).float().sum().reshape(1))
    return run


def test_n_helpers_run_n_trainings_at_once(tmp_path: Path) -> None:
    """The runs really overlap: with ``fanout=3`` three of a case's six runs (FP32, FP64, four strategies)
    are in flight at the same moment, each in a process other than the worker."""
    where = tmp_path / "spans"
    where.mkdir()
    s = Scenario(name="fan_timed", family="reduction", description="a slow sum", grid={"k": [0]}, inputs=_x,
                 run=_timed(where), n=lambda p: 64)
    run_matrix(RunConfig([s], resolve(["fp32", "fp16", "bf16", "fp16-pure"]), torch.device("cpu"),
                         out=tmp_path / "r", workers=1, fanout=3))
    spans = [tuple(map(float, f.read_text().split())) for f in where.iterdir()]
    assert len(spans) == 6
    most = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert most == 3
    assert len({f.name.split("-")[0] for f in where.iterdir()}) == 3  # three helpers ran them all


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_check_model_with_helpers_writes_the_records_of_one_run_after_another(tmp_path: Path) -> None:
    """On CUDA the reference adds its 4-update rerun probe, and each helper has its own CUDA context: the
    records are still bit for bit the serial ones (deterministic kernels in every process)."""
    from conftest import run_cli
    dirs = []
    for n in (1, 3):
        out = tmp_path / f"p{n}"
        r = run_cli("check-model", "examples.third_party_model:factory", "--device", "cuda", "--steps", "8",
                    "--no-cache", "--no-diagnose", "--parallel", str(n), "--out", str(out), timeout=600)
        assert r.rc in (0, 1), r.stderr
        dirs.append(out)
    assert compare(*dirs) == []
    isolation = json.loads((dirs[1] / "run.json").read_text())["summary"]["isolation"]
    assert "up to 3 of a case's runs at once" in isolation
    check = _records(dirs[1])[0]["reference"]
    assert check.get("fp32_rerun") or "fp32_rerun_diff" in check  # the rerun ran (in a helper, or here)
