"""The runner, in-process, on throwaway scenarios: records, references, errors, unsupported, resume."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from conftest import add_scenario
from harness.run.engine import RunConfig, resolve_device, run_matrix
from harness.results import RECORD_FIELDS, read_run
from harness.core.scenario import Expect, Output, Scenario
from harness.core.strategy import PRESETS, parse

CPU = torch.device("cpu")
CALLS: dict[str, int] = {}


def _echo(ex, inp: dict, p: dict) -> Output:
    """The input handed over in the activation format: FP16 flushes 2^-30 and overflows 2^17."""
    CALLS["echo"] = CALLS.get("echo", 0) + 1
    return Output(value=ex.act(inp["x"]).float())


def _echo_inputs(p: dict, g: torch.Generator) -> dict:
    return {"x": torch.tensor([1.0, 2.0, 3.0, 4.0]) * 2.0 ** p["e"]}


def _scn(name: str, run=_echo, inputs=_echo_inputs, grid=None, **kw) -> Scenario:
    return Scenario(name=name, family="reduction", description="engine test", grid=grid or {"e": [0]},
                    inputs=inputs, run=run, **kw)


def _cfg(scenarios: list[Scenario], strategies: list[str], out: Path, **kw) -> RunConfig:
    kw.setdefault("workers", 0)  # in this process: these tests count the scenario's calls here
    return RunConfig(scenarios, [parse(s) for s in strategies], CPU, out=out, **kw)


def test_records_outcomes_and_references_reused(tmp_path: Path, temp_scenarios: list) -> None:
    s = add_scenario(temp_scenarios, _scn("a_engine_echo", grid={"e": [0, -30, 17]},
                                          expect=(Expect(("fp16",), "underflow", "below 2^-24",
                                                         when=lambda p: p["e"] == -30),)))
    CALLS.clear()
    out, summary, stats = run_matrix(_cfg([s], ["fp32", "fp16", "bf16"], tmp_path / "r", seeds=2))
    header, recs = read_run(out)
    assert len(recs) == 3 * 2 * 3 == stats["records"] == header["expected_records"]
    assert all(set(RECORD_FIELDS) <= set(r) for r in recs)
    # references: one per (case, seed), reused by the other strategies; each is an FP32 and an FP64 run
    assert (stats["references_computed"], stats["references_reused"]) == (6, 12)
    assert CALLS["echo"] == 6 * 2 + 18
    by = {(r["params"]["e"], r["seed"], r["strategy"]): r for r in recs}
    assert {by[(0, 0, st)]["outcome"] for st in ("fp32", "fp16", "bf16")} == {"pass"}
    under = by[(-30, 1, "fp16")]
    assert under["outcome"] == "underflow" and under["metrics"]["underflow_frac"] == 1.0
    assert under["expected"] == {"outcome": "underflow", "reason": "below 2^-24"}
    assert by[(17, 0, "fp16")]["outcome"] == "overflow" and by[(17, 0, "bf16")]["outcome"] == "pass"
    assert by[(0, 0, "fp16")]["strategy_spec"] == str(PRESETS["fp16"]) and by[(0, 0, "fp16")]["case"] == \
        "a_engine_echo[e=0]"
    assert summary.by_strategy["fp16"] == {"pass": 2, "underflow": 2, "overflow": 2}
    assert header["status"] == "complete" and header["summary"]["by_strategy"]["fp32"] == {"pass": 6}


def test_a_raising_scenario_is_an_error_record_and_the_run_goes_on(tmp_path: Path, temp_scenarios: list) -> None:
    def boom(ex, inp, p):
        if p["e"] == 1 and ex.strategy.compute == "fp16":
            raise RuntimeError("kaboom in the scenario")
        return _echo(ex, inp, p)

    s = add_scenario(temp_scenarios, _scn("a_engine_boom", run=boom, grid={"e": [1, 2]}))
    out, summary, _ = run_matrix(_cfg([s], ["fp16", "fp32"], tmp_path / "r"))
    _, recs = read_run(out)
    by = {(r["params"]["e"], r["strategy"]): r for r in recs}
    err = by[(1, "fp16")]
    assert err["outcome"] == "error" and err["reason"] == "RuntimeError: kaboom in the scenario"
    assert "Traceback (most recent call last)" in err["traceback"] and "kaboom in the scenario" in err["traceback"]
    assert [by[k]["outcome"] for k in ((1, "fp32"), (2, "fp16"), (2, "fp32"))] == ["pass"] * 3


def test_failing_inputs_and_references_and_bad_outputs_are_errors(tmp_path: Path, temp_scenarios: list) -> None:
    def bad_inputs(p, g):
        raise ValueError("no data")

    def ref_fails(ex, inp, p):
        if ex.strategy.compute == "fp64":
            raise ArithmeticError("fp64 path broken")
        return _echo(ex, inp, p)

    a = add_scenario(temp_scenarios, _scn("a_engine_noinputs", inputs=bad_inputs))
    b = add_scenario(temp_scenarios, _scn("a_engine_noref", run=ref_fails))
    c = add_scenario(temp_scenarios, _scn("a_engine_garbage", run=lambda ex, inp, p: (
        {"value": inp["x"]} if ex.strategy.compute == "fp16" else _echo(ex, inp, p))))
    out, _, stats = run_matrix(_cfg([a, b, c], ["fp32", "fp16"], tmp_path / "r"))
    _, recs = read_run(out)
    reasons = {(r["scenario"], r["strategy"]): r["reason"] for r in recs}
    assert {r["outcome"] for r in recs if r["scenario"] != "a_engine_garbage"} == {"error"}
    assert reasons[("a_engine_noinputs", "fp32")] == "building inputs failed: ValueError: no data"
    assert reasons[("a_engine_noinputs", "fp16")] == "building inputs failed: ValueError: no data"
    assert reasons[("a_engine_noref", "fp32")] == "ArithmeticError: fp64 path broken"
    assert reasons[("a_engine_noref", "fp16")].startswith("RuntimeError: the reference of this case failed")
    assert reasons[("a_engine_garbage", "fp16")] == "TypeError: scenario a_engine_garbage.run returned dict, " \
                                                   "expected harness.Output"
    # the failed reference is not recomputed for fp16; the garbage scenario's reference is fine
    assert stats["references_computed"] == 2


def test_a_case_past_its_deadline_is_an_error(tmp_path: Path, temp_scenarios: list) -> None:
    def slow(ex, inp, p):
        if ex.strategy.compute == "fp16":
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 5:
                pass
        return _echo(ex, inp, p)

    s = add_scenario(temp_scenarios, _scn("a_engine_slow", run=slow))
    t0 = time.perf_counter()
    out, _, _ = run_matrix(_cfg([s], ["fp16", "fp32"], tmp_path / "r", timeout=0.2))
    assert time.perf_counter() - t0 < 3
    _, recs = read_run(out)
    assert [(r["strategy"], r["outcome"]) for r in recs] == [("fp16", "error"), ("fp32", "pass")]
    assert recs[0]["reason"] == "CaseTimeout: case exceeded its 0.2 s timeout"


def test_unsupported_is_a_verdict_with_a_reason(tmp_path: Path, temp_scenarios: list) -> None:
    gpu = add_scenario(temp_scenarios, _scn("a_engine_gpu_only", devices=("cuda",)))
    cpu = add_scenario(temp_scenarios, _scn("a_engine_cpu"))
    out, summary, _ = run_matrix(_cfg([gpu, cpu], ["fp16", "compute=fp16,reduction=reduced"], tmp_path / "r"))
    _, recs = read_run(out)
    got = {(r["scenario"], r["strategy"] == "fp16"): (r["outcome"], r["reason"]) for r in recs}
    assert got[("a_engine_gpu_only", True)] == ("unsupported", "scenario a_engine_gpu_only runs on cuda only, not cpu")
    assert got[("a_engine_cpu", False)][0] == "unsupported" and "needs cuBLAS" in got[("a_engine_cpu", False)][1]
    assert got[("a_engine_cpu", True)][0] == "pass"


def test_fp64_becomes_the_reference_where_fp32_is_not_trustworthy(tmp_path: Path, temp_scenarios: list) -> None:
    def cancel(ex, inp, p):
        a = ex.act(inp["a"])  # a*a - 1 with a = 1 + 2^-12: FP32 rounds a*a = 1 + 2^-11 + 2^-24 (a tie) to 1 + 2^-11
        return Output(value=(a * a - 1).float().reshape(1))

    s = add_scenario(temp_scenarios, _scn("a_engine_cancel", run=cancel,
                                          inputs=lambda p, g: {"a": torch.tensor(1 + 2.0**-12)}))
    out, _, _ = run_matrix(_cfg([s], ["fp32", "bf16"], tmp_path / "r"))
    _, recs = read_run(out)
    fp32 = recs[0]
    assert fp32["reference"]["format"] == "fp64"
    rel = 2.0**-24 / (2.0**-11 + 2.0**-24)  # FP32's own error against FP64
    assert fp32["reference"]["fp32_vs_fp64"] == rel and fp32["metrics"]["rel_err"] == rel
    assert "FP64 is the reference" in fp32["reference"]["reason"]
    assert fp32["outcome"] == "pass" and fp32["bound"] == rel  # FP32 is held to its own error, no tighter
    # bf16 rounds a to 1, so a*a - 1 = 0: a zero from cancellation (the reference, 2^-11, is far above
    # bf16's smallest normal) is an error of the result, not an underflow
    assert recs[1]["outcome"] == "diverged" and recs[1]["metrics"]["rel_err"] == 1.0


def test_resume_runs_exactly_the_missing_records(tmp_path: Path, temp_scenarios: list) -> None:
    s = add_scenario(temp_scenarios, _scn("a_engine_resume", grid={"e": [0, 1]}))
    out = tmp_path / "r"
    run_matrix(_cfg([s], ["fp32"], out))
    with open(out / "records.jsonl", "a") as f:
        f.write('{"schema_version": 1, "scen')  # a torn last line from a killed run
    with pytest.warns(UserWarning, match="torn"):
        _, summary, stats = run_matrix(_cfg([s], ["fp32", "bf16"], out), resume=True)
    _, recs = read_run(out)
    assert stats["records_this_session"] == 2 and stats["records"] == 4
    assert sorted((r["params"]["e"], r["strategy"]) for r in recs) == [(0, "bf16"), (0, "fp32"), (1, "bf16"),
                                                                     (1, "fp32")]


def test_bookkeeping_excludes_the_scenarios_references_and_inputs(tmp_path: Path, temp_scenarios: list) -> None:
    def sleepy_inputs(p, g):
        time.sleep(0.05)
        return _echo_inputs(p, g)

    def sleepy(ex, inp, p):
        time.sleep(0.02)
        return _echo(ex, inp, p)

    s = add_scenario(temp_scenarios, _scn("a_engine_sleepy", run=sleepy, inputs=sleepy_inputs, grid={"e": [0, 1]}))
    _, _, st = run_matrix(_cfg([s], ["fp32", "fp16"], tmp_path / "r"))
    # 2 cases: inputs 2 x 0.05 s; references 2 x (FP32 + FP64) x 0.02 s; strategy runs 4 x 0.02 s
    assert st["seconds_building_inputs"] >= 0.1 and st["seconds_in_references"] >= 0.08
    assert st["seconds_in_scenarios"] >= 0.08
    inside = st["seconds_in_scenarios"] + st["seconds_in_references"] + st["seconds_building_inputs"]
    assert st["bookkeeping_ms_per_record"] == pytest.approx(1000 * (st["wall_seconds"] - inside) / 4)
    assert 0 <= st["bookkeeping_ms_per_record"] < 1000 * 0.02  # the sleeps are not counted as bookkeeping


def test_bookkeeping_of_several_workers_counts_each_workers_time(tmp_path: Path, temp_scenarios: list) -> None:
    """Two workers run cases side by side: the time inside scenarios, summed over them, exceeds the run's
    wall time, and wall less it came out negative (the CPU default run printed -2.8 ms per record). The
    harness's own time is each worker's wall less its time inside."""
    def sleepy(ex, inp, p):
        time.sleep(0.1)
        return _echo(ex, inp, p)

    s = add_scenario(temp_scenarios, _scn("a_engine_sleepy2", run=sleepy, grid={"e": [0, 1, 2, 3]}))
    _, _, st = run_matrix(RunConfig([s], [PRESETS["fp32"]], CPU, out=tmp_path / "r", workers=2))
    inside = st["seconds_in_scenarios"] + st["seconds_in_references"] + st["seconds_building_inputs"]
    assert inside > st["wall_seconds"]  # the two workers overlapped
    assert st["workers"] == 2
    assert st["bookkeeping_ms_per_record"] == pytest.approx(1000 * (2 * st["wall_seconds"] - inside) / 4)
    assert 0 <= st["bookkeeping_ms_per_record"]


def test_device_resolution() -> None:
    assert resolve_device("cpu") == CPU
    with pytest.raises(ValueError, match="unknown device 'tpu'; use cpu, cuda or auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
        with pytest.raises(ValueError, match="--device cuda: no CUDA device is available here"):
            resolve_device("cuda")


def test_peak_bytes_counts_only_what_the_case_allocated(monkeypatch) -> None:
    from harness.run import engine
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(d))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 100 * 2**20)  # inputs, reference
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 250 * 2**20)
    cuda = torch.device("cuda")
    start = engine._peak_reset(cuda)
    assert calls == [cuda] and start == 100 * 2**20
    assert engine._peak(cuda, start) == 150 * 2**20
    assert engine._peak_reset(torch.device("cpu")) == 0 and engine._peak(torch.device("cpu"), 0) is None


def test_every_run_of_a_scenario_is_under_the_strategy_s_gemm_flags(tmp_path: Path, temp_scenarios: list,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # the reference's FP32 runs and each strategy's run call Scenario.execute, which holds ex.gemm_flags()
    # for the whole run: a GEMM outside ex.autocast() is under the strategy's TF32 setting too
    import contextlib

    from harness.core.execution import Execution
    inside: list[str] = []
    entered: list[str] = []

    @contextlib.contextmanager
    def flags(self):  # noqa: ANN001, ANN202
        entered.append(self.strategy.compute)
        yield

    monkeypatch.setattr(Execution, "gemm_flags", flags)

    def run(ex, inp, p) -> Output:  # noqa: ANN001
        inside.append(ex.strategy.compute if entered and entered[-1] == ex.strategy.compute else "outside")
        return Output(value=inp["x"] @ inp["x"].T)  # a GEMM outside ex.autocast()

    s = add_scenario(temp_scenarios, Scenario(name="t_bare_gemm", family="reduction", description="d",
                                              grid={"k": [0]}, inputs=lambda p, g: {"x": torch.rand(4, 8, generator=g)},
                                              run=run, n=lambda p: 8))
    run_matrix(RunConfig([s], [PRESETS["fp32"], PRESETS["tf32"]], torch.device("cpu"), out=tmp_path / "r",
                         workers=0))  # in this process: the test watches the calls here
    # reference: FP32 and FP64 runs; then the fp32 and tf32 strategies
    assert inside == ["fp32", "fp64", "fp32", "tf32"], inside


def test_execute_rejects_what_is_not_an_output() -> None:
    from harness.core.execution import Execution
    s = Scenario(name="t_bad", family="reduction", description="d", grid={}, inputs=lambda p, g: {},
                 run=lambda ex, inp, p: {"value": 1})
    with pytest.raises(TypeError, match="scenario t_bad.run returned dict, expected harness.Output"):
        s.execute(Execution(PRESETS["fp32"], torch.device("cpu")), {}, {})


# -- a reference nothing can be judged against; the margin ------------------------------------------------
def test_a_non_finite_reference_is_an_error_for_every_strategy_and_nothing_runs(tmp_path: Path,
                                                                                 temp_scenarios: list) -> None:
    runs: list[str] = []

    def overflow_everywhere(ex, inp, p) -> Output:  # noqa: ANN001
        runs.append(ex.strategy.compute)
        x = ex.act(inp["x"])
        return Output(value=(x / (x - x)).float(), grads={"w": x.float()})  # 1/0 = inf in FP64 too

    s = add_scenario(temp_scenarios, _scn("a_engine_inf_ref", run=overflow_everywhere))
    out, summary, _ = run_matrix(_cfg([s], ["fp32", "fp16", "bf16"], tmp_path / "r"))
    _, recs = read_run(out)
    want = ("reference not finite under FP32 and FP64: value: 4 of 4 entries inf/NaN (first at (0,): inf); nothing "
            "can be judged against it (a scenario that means this declares nonfinite_reference='why')")
    assert [(r["outcome"], r["reason"], r["margin"], r["metrics"]) for r in recs] == [("error", want, None, {})] * 3
    assert runs == ["fp32", "fp64"]  # the reference's two runs; no strategy ran
    assert summary.by_strategy["fp16"] == {"error": 1}


def test_a_declared_non_finite_reference_is_judged_on_the_rest(tmp_path: Path, temp_scenarios: list) -> None:
    def masked_log_probs(ex, inp, p) -> Output:  # noqa: ANN001
        x = ex.act(inp["x"])
        with ex.autocast():
            y = torch.log_softmax(x.float().masked_fill(inp["mask"], -math.inf), dim=-1)
        return Output(value=y)

    why = "masked positions have log-probability -inf by construction"
    s = add_scenario(temp_scenarios, _scn(
        "a_engine_masked", run=masked_log_probs, nonfinite_reference=why, n=lambda p: 4,
        inputs=lambda p, g: {"x": torch.tensor([[0.1, 0.7, 1 / 3, 2.5]]),
                             "mask": torch.tensor([[False, True, False, False]])}))
    out, _, _ = run_matrix(_cfg([s], ["fp32", "bf16"], tmp_path / "r"))
    _, recs = read_run(out)
    by = {r["strategy"]: r for r in recs}
    assert by["fp32"]["outcome"] == "pass" and by["fp32"]["metrics"]["ref_nonfinite"] == 1
    assert by["fp32"]["reference"]["nonfinite"] == ("value: 1 of 4 entries inf/NaN (first at (0, 1): -inf) "
                                                    f"(declared: {why})")
    bf = by["bf16"]
    assert (bf["metrics"]["nonfinite_mismatch"], bf["metrics"]["nonfinite"]) == (0, 0)
    assert bf["metrics"]["rel_err"] > 2.0**-14 and bf["margin"] == bf["metrics"]["rel_err"] / bf["bound"]


def test_fp32_alone_non_finite_makes_fp64_the_reference_not_an_error(tmp_path: Path, temp_scenarios: list) -> None:
    def exp_big(ex, inp, p) -> Output:  # noqa: ANN001
        return Output(value=torch.exp(ex.act(inp["x"])).to(torch.promote_types(ex.dtype, torch.float32)))

    s = add_scenario(temp_scenarios, _scn("a_engine_exp", run=exp_big,
                                          inputs=lambda p, g: {"x": torch.tensor([1.0, 100.0])}))
    out, _, _ = run_matrix(_cfg([s], ["fp32", "bf16"], tmp_path / "r"))
    _, recs = read_run(out)
    assert [r["reference"]["format"] for r in recs] == ["fp64", "fp64"]
    assert [r["outcome"] for r in recs] == ["overflow", "overflow"]  # exp(100) = 2.7e43: past FP32 and BF16's max


def test_every_judged_record_carries_its_margin(tmp_path: Path, temp_scenarios: list) -> None:
    s = add_scenario(temp_scenarios, _scn("a_engine_margin", grid={"e": [0, -30]}))
    out, _, _ = run_matrix(_cfg([s], ["fp32", "fp16"], tmp_path / "r"))
    _, recs = read_run(out)
    by = {(r["params"]["e"], r["strategy"]): r for r in recs}
    assert by[(0, "fp32")]["margin"] == 0.0  # 1, 2, 3, 4 times 2^0: exact in every format
    under = by[(-30, "fp16")]  # every value flushed to zero: rel_err 1
    assert under["outcome"] == "underflow" and under["margin"] == 1.0 / under["bound"]


def test_a_scenario_that_only_measures_is_recorded_and_never_a_pass(tmp_path: Path, temp_scenarios: list) -> None:
    def profile(ex, inp, p) -> Output:  # noqa: ANN001
        return Output(extra={"profile": {"accumulator_bits": 24 if ex.strategy.compute == "fp32" else 13}})

    s = add_scenario(temp_scenarios, _scn("a_engine_profile", run=profile))
    out, _, _ = run_matrix(_cfg([s], ["fp32", "fp16"], tmp_path / "r"))
    _, recs = read_run(out)
    assert [(r["outcome"], r["margin"], r["metrics"]["profile"]["accumulator_bits"]) for r in recs] == \
        [("unsupported", None, 24), ("unsupported", None, 13)]
    assert recs[1]["reason"] == ("not judged: scenario a_engine_profile returns measurements only (profile in the "
                                 "record's metrics), no value, gradients or loss curve to compare")
