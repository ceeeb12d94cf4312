"""Scenarios in supervised worker processes, through the real CLI with a hostile ``--import`` module.

Each fault below used to end the run (or hang it for ever); now the case becomes an ``error`` record
naming what happened and the run goes on. The OOM killer is simulated by a scenario that sends its own
process SIGKILL, which is what the kernel's OOM killer sends.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import read_jsonl, run_cli
from harness.core.scenario import Output, Scenario

HOSTILE = '''
import ctypes
import os
import signal
import time

import torch
from harness.core.scenario import Expect, Output, Scenario, register


def _x(p, g):
    return {"x": torch.rand(8, generator=g) + 0.5}


def _healthy(ex, inp, p):
    return Output(value=ex.act(inp["x"]).float())


def _faulty(fault):
    def run(ex, inp, p):
        if ex.strategy.compute != "fp16" or p["k"] != 1:  # FP32 (the reference) and k = 0, 2 are healthy
            return _healthy(ex, inp, p)
        if fault == "segv":
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        if fault == "exit0":
            os._exit(0)
        if fault == "oom":
            os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
        if fault == "swallow":
            while True:  # swallows the worker's own deadline (CaseTimeout is an Exception)
                try:
                    time.sleep(0.01)
                except Exception:
                    pass
    return run


for fault in ("segv", "exit0", "oom", "swallow"):
    register(Scenario(name=f"w_{fault}", family="reduction", description=f"fault {fault} under fp16 at k=1",
                      grid={"k": [0, 1, 2]}, inputs=_x, run=_faulty(fault)))


def _hanging_inputs(p, g):
    while p["k"] == 1:
        time.sleep(0.01)
    return _x(p, g)


register(Scenario(name="w_inputs", family="reduction", description="inputs() never returns at k=1",
                  grid={"k": [0, 1, 2]}, inputs=_hanging_inputs, run=_healthy))


def _raising_when(p):
    return 1 // (p["k"] - 1) > 0  # ZeroDivisionError at k=1


register(Scenario(name="w_expect", family="reduction", description="Expect(when=...) raises at k=1",
                  grid={"k": [0, 1, 2]}, inputs=_x, run=_healthy,
                  expect=(Expect(("fp16",), "diverged", "never", when=_raising_when),)))


def _raising_n(p):
    if p["k"] == 1:
        raise RuntimeError("n exploded on purpose")
    return 8


register(Scenario(name="w_n", family="reduction", description="n(...) raises at k=1", grid={"k": [0, 1, 2]},
                  inputs=_x, run=_healthy, n=_raising_n))
'''

ARGS = ("--import", "w_hostile", "--scenario", "w_*", "--strategy", "fp32", "--strategy", "fp16", "--device", "cpu",
        "--timeout", "1", "--quiet")


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, dict, dict]:
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "w_hostile.py").write_text(HOSTILE)
    out = tmp / "run"
    res = run_cli("run", *ARGS, "--out", str(out), pythonpath=tmp, timeout=300)
    header = json.loads((out / "run.json").read_text())
    records = read_jsonl(out / "records.jsonl")
    return res, header, {(r["case"], r["strategy"]): r for r in records}


def test_the_run_survives_every_fault_and_completes(hostile_run) -> None:
    res, header, recs = hostile_run
    assert res.rc == 0, res.stderr
    assert header["status"] == "complete"
    assert len(recs) == header["expected_records"] == 7 * 3 * 2  # nothing lost to a fault
    assert header["summary"]["by_strategy"]["fp16"] == {"pass": 14, "error": 7}
    # under FP32: the hanging inputs, and n (every strategy's bound calls it)
    assert header["summary"]["by_strategy"]["fp32"] == {"pass": 19, "error": 2}
    for name in ("segv", "exit0", "oom", "swallow", "expect"):  # the run went on, case by case
        assert recs[(f"w_{name}[k=1]", "fp32")]["outcome"] == "pass"
        assert recs[(f"w_{name}[k=2]", "fp16")]["outcome"] == "pass"


@pytest.mark.parametrize("fault, reason, exitcode", [
    ("segv", "the worker process was killed by SIGSEGV (11) (a segmentation fault", -11),
    ("exit0", "the worker process exited with code 0 while running this case (os._exit", 0),
    ("oom", "the worker process was killed by SIGKILL (9) (the kernel's OOM killer", -9),
])
def test_a_dying_worker_is_an_error_record_naming_the_signal_or_exit_code(hostile_run, fault: str, reason: str,
                                                                         exitcode: int) -> None:
    rec = hostile_run[2][(f"w_{fault}[k=1]", "fp16")]
    assert rec["outcome"] == "error" and rec["reason"].startswith(reason), rec["reason"]
    assert rec["worker"] == {"event": "died", "exitcode": exitcode}
    assert rec["metrics"] == {} and rec["n"] is None


def test_a_swallowed_timeout_is_killed_at_the_supervisors_deadline(hostile_run) -> None:
    rec = hostile_run[2][("w_swallow[k=1]", "fp16")]
    assert rec["outcome"] == "error"
    assert rec["reason"].startswith("deadline: the case ran past its 1 s timeout (+ 1 s grace)"), rec["reason"]
    assert rec["worker"] == {"event": "deadline", "exitcode": -9}
    assert 2.0 <= rec["seconds"] < 3.5


def test_inputs_that_never_return_are_stopped_for_every_strategy(hostile_run) -> None:
    recs = hostile_run[2]
    for st in ("fp32", "fp16"):  # each strategy was tried in a fresh worker, and killed at its deadline
        rec = recs[("w_inputs[k=1]", st)]
        assert rec["outcome"] == "error" and rec["reason"].startswith("deadline: "), rec["reason"]
        assert 2.0 <= rec["seconds"] < 3.5
    assert recs[("w_inputs[k=2]", "fp32")]["outcome"] == recs[("w_inputs[k=0]", "fp16")]["outcome"] == "pass"


@pytest.mark.parametrize("name, text", [("expect", "ZeroDivisionError: integer division or modulo by zero"),
                                        ("n", "RuntimeError: n exploded on purpose")])
def test_an_expect_or_n_callable_that_raises_is_an_error_record(hostile_run, name: str, text: str) -> None:
    rec = hostile_run[2][(f"w_{name}[k=1]", "fp16")]
    assert rec["outcome"] == "error" and rec["reason"].endswith(text), rec["reason"]
    assert "Traceback (most recent call last)" in rec["traceback"]


def test_a_resume_of_the_hostile_run_has_nothing_left_to_do(hostile_run, tmp_path: Path) -> None:
    res, header, _ = hostile_run
    out = Path(res.stdout.strip().split(" -> ")[-1])
    again = run_cli("run", "--resume", str(out), "--quiet", pythonpath=out.parent)
    assert again.rc == 0, again.stderr
    assert json.loads((out / "run.json").read_text())["summary"]["records_this_session"] == 0


TRIVIAL = '''
import torch
from harness.core.scenario import Output, Scenario, register

register(Scenario(name="w_sum", family="reduction", description="a sum", grid={"k": list(range(6))},
                  inputs=lambda p, g: {"x": torch.rand(64, generator=g) + 0.5},
                  run=lambda ex, inp, p: Output(value=ex.act(inp["x"]).sum().float()), n=lambda p: 64))
'''


def test_two_workers_give_the_records_and_reference_counts_of_one(tmp_path: Path) -> None:
    (tmp_path / "w_sum.py").write_text(TRIVIAL)
    runs = {}
    for n in ("0", "1", "2"):
        out = tmp_path / f"w{n}"
        res = run_cli("run", "--import", "w_sum", "--scenario", "w_sum", "--strategy", "fp32", "--strategy", "bf16",
                      "--strategy", "fp16", "--device", "cpu", "--quiet", "--workers", n, "--out", str(out),
                      pythonpath=tmp_path)
        assert res.rc == 0, res.stderr
        s = json.loads((out / "run.json").read_text())["summary"]
        assert (s["references_computed"], s["references_reused"]) == (6, 12)  # once per case, in any worker
        runs[n] = {(r["case"], r["strategy"]): {k: v for k, v in r.items() if k != "seconds"}
                   for r in read_jsonl(out / "records.jsonl")}
        assert s["isolation"].startswith("in-process" if n == "0" else f"{n} worker process")
    assert runs["0"] == runs["1"] == runs["2"] and len(runs["0"]) == 18


def test_cases_are_generated_lazily() -> None:
    from harness.core.scenario import iter_cases
    s = Scenario(name="w_lazy", family="reduction", description="d", grid={"k": [0, 1]},
                 inputs=lambda p, g: {}, run=lambda ex, i, p: Output())
    it = iter_cases([s], "full", 10**12)  # would need petabytes as a list
    assert [(c.params["k"], c.seed) for c in (next(it), next(it))] == [(0, 0), (0, 1)]


def test_a_billion_seeds_is_refused_with_the_estimate(tmp_path: Path) -> None:
    res = run_cli("run", "--scenario", "softmax_long", "--strategy", "fp32", "--seeds", "1000000000", "--device",
                  "cpu", "--out", str(tmp_path / "r"), timeout=60)
    assert res.rc == 2
    assert res.stderr.startswith("error: this run would write 2,000,000,000 records (2,000,000,000 cases x 1 "
                                 "strategies), more than --max-records 1,000,000;"), res.stderr
    assert "115.7 days" in res.stderr and len(res.stderr.splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_workers_run_cases_on_the_gpu(hostile_run, tmp_path: Path) -> None:
    """On CUDA the supervisor never initialises CUDA itself (NVML check; the GPU's name is read in a
    forked process), so its workers can; a segfault there is an error record too."""
    res, _, _ = hostile_run
    mod_dir = Path(res.stdout.strip().split(" -> ")[-1]).parent
    out = tmp_path / "gpu"
    r = run_cli("run", "--import", "w_hostile", "--scenario", "w_segv", "--strategy", "fp32", "--strategy", "fp16",
                "--device", "cuda", "--quiet", "--out", str(out), pythonpath=mod_dir)
    assert r.rc == 0, r.stderr
    header = json.loads((out / "run.json").read_text())
    from harness.run.supervisor import default_workers
    n = min(3, default_workers(torch.device("cuda")))  # one per core up to 4, on a GPU too; no more than cases
    assert header["summary"]["isolation"].startswith(f"{n} worker process") and header["environment"]["gpu"]
    recs = {(x["case"], x["strategy"]): x for x in read_jsonl(out / "records.jsonl")}
    assert recs[("w_segv[k=1]", "fp16")]["worker"]["exitcode"] == -11
    assert recs[("w_segv[k=2]", "fp16")]["outcome"] == "pass"


def _parallel_sum() -> float:
    return float(torch.ones(1 << 23).clone().sum())  # large enough for torch to run it on its thread pool


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)  # the tests run on one (conftest); OpenMP's pool needs two
    yield
    torch.set_num_threads(saved)


def test_a_fork_after_openmp_ran_in_this_process_does_not_hang(tmp_path: Path, two_threads) -> None:
    """GNU OpenMP's pool does not survive fork: after one parallel region here, a forked child's first parallel
    region waited forever (check-model's preflight, called from Python after the user's own CPU work, ran
    into its 600 s deadline). Both ways this process forks: ``isolated`` and the supervisor's workers."""
    from harness.core.strategy import resolve
    from harness.run.engine import RunConfig, run_matrix
    from harness.run.worker import isolated
    _parallel_sum()
    assert isolated(_parallel_sum, (), timeout=60) == float(1 << 23)
    s = Scenario(name="w_openmp", family="reduction", description="a sum on torch's thread pool", grid={"k": [0]},
                 inputs=lambda p, g: {"x": torch.rand(1 << 23, generator=g) + 0.5},
                 run=lambda ex, inp, p: Output(value=inp["x"].clone().sum().reshape(1)))
    _parallel_sum()
    out, _, _ = run_matrix(RunConfig([s], resolve(["fp32"]), torch.device("cpu"), out=tmp_path / "r", timeout=60,
                                     workers=1))
    assert [r["outcome"] for r in read_jsonl(out / "records.jsonl")] == ["pass"]
    assert _parallel_sum() == float(1 << 23)  # and this process still computes


def test_where_the_pool_cannot_be_freed_the_child_computes_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.run import worker

    class NoPause:  # an OpenMP runtime older than OpenMP 5: no omp_pause_resource_all
        pass

    class Refuses:
        def omp_pause_resource_all(self, kind) -> int:
            return -1
    for lib in (NoPause(), Refuses()):
        monkeypatch.setattr(worker, "_GOMP", [lib])
        assert worker.prepare_fork(4) == 1 and worker.prepare_fork(None) == 1
    monkeypatch.setattr(worker, "_GOMP", [])
    monkeypatch.setattr(worker, "open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")), raising=False)
    assert worker.prepare_fork(4) == 4  # no GNU OpenMP found: nothing to free, the child gets what was asked
