"""Isolation of runs (harness/core/isolation.py): a run that writes into its inputs or leaves global state
changed is an ``error`` naming what it changed, and nothing reaches the next run or case.

The unit tests drive :func:`harness.core.isolation.isolated` directly; the fault-injection test runs a module
of hostile scenarios through the real command line (``run --import``), as a user's would run, and checks
that no ``pass`` comes out of them and that a well-behaved scenario's records are the same whether it
runs alone or after them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import read_jsonl, run_cli
from harness.core.isolation import STATE, CaseInputs, SideEffect, global_state, isolated

X = [1.0, 2.0, 0.5, 0.25]


def _inputs() -> CaseInputs:
    return CaseInputs({"x": torch.tensor(X), "n": 4, "parts": [torch.tensor([8.0, 16.0])]})


# -- inputs -----------------------------------------------------------------------------------------
def _in_place(inp: dict) -> None:
    inp["x"].mul_(3.0)


def _behind_the_counter(inp: dict) -> None:
    inp["x"].data.mul_(3.0)  # .data has its own version counter: autograd does not see this write


def _numpy_write(inp: dict) -> None:
    inp["x"].numpy()[1] = 7.0


def _optimizer_on_an_input(inp: dict) -> None:
    w = inp["x"].requires_grad_()
    opt = torch.optim.SGD([w], lr=0.5)
    (w * w).sum().backward()
    opt.step()


def _clamp_no_grad(inp: dict) -> None:
    with torch.no_grad():
        inp["x"].clamp_(max=1.0)


def _nested(inp: dict) -> None:
    inp["parts"][0][1] = -1.0


@pytest.mark.parametrize("write, said, x_after", [
    (_in_place, "`x` in place", X),
    (_behind_the_counter, "`x` behind autograd's version counter", X),
    (_numpy_write, "`x` behind autograd's version counter", X),
    (_optimizer_on_an_input, "`x` in place, `x`'s requires_grad (False -> True), `x`'s .grad", X),
    (_clamp_no_grad, "`x` in place", X),
    (_nested, "`parts[0]` in place", X),
])
def test_a_write_into_the_inputs_is_named_and_undone(write: Callable, said: str, x_after: list[float]) -> None:
    inp = _inputs()
    with pytest.raises(SideEffect) as exc:
        with isolated("s_w", "its fp16 run", inp) as own:
            write(own)
    assert str(exc.value).startswith(f"scenario s_w modified its input {said}")
    assert "during its fp16 run (restored;" in str(exc.value)
    # the very tensors the next run gets hold the pristine values, with no grad and no requires_grad
    assert inp["x"].tolist() == x_after and not inp["x"].requires_grad and inp["x"].grad is None
    assert inp["parts"][0].tolist() == [8.0, 16.0]
    with isolated("s_w", "its bf16 run", inp):  # and the next run is clean
        pass


def test_rebinding_a_key_or_reading_the_inputs_is_no_side_effect() -> None:
    inp = CaseInputs({"x": torch.tensor([float("nan"), -0.0, 2.0**-149])})  # NaN equals itself bit for bit
    with isolated("s_r", "its fp32 run", inp) as own:
        own["x"] = own["x"] * 2.0
        own["extra"] = 1
        _ = (inp["x"] + 1).sum()
    assert set(inp) == {"x"} and inp["x"][2].item() == 2.0**-149


def test_a_sign_flip_of_zero_is_a_write() -> None:
    inp = CaseInputs({"x": torch.tensor([0.0, 1.0])})
    with pytest.raises(SideEffect, match="`x` in place"):
        with isolated("s_z", "its fp32 run", inp) as own:
            own["x"].mul_(-1.0)  # -0.0 == 0.0 numerically; the bits differ
    assert torch.equal(inp["x"].view(torch.int32), torch.tensor([0.0, 1.0]).view(torch.int32))


def test_a_plain_dict_is_checked_against_a_copy_taken_on_entry() -> None:
    inp = {"x": torch.tensor([2.0, 4.0])}
    with pytest.raises(SideEffect, match="behind autograd's version counter"):
        with isolated("s_p", "its fp32 run", inp) as own:
            own["x"].data[0] = 5.0
    assert inp["x"].tolist() == [2.0, 4.0]


def test_a_run_that_raises_keeps_its_own_error_and_is_still_undone() -> None:
    inp = _inputs()
    with pytest.raises(ZeroDivisionError):
        with isolated("s_e", "its fp16 run", inp) as own:
            own["x"].add_(1.0)
            torch.set_default_dtype(torch.float64)
            raise ZeroDivisionError("own error")
    assert inp["x"].tolist() == X and torch.get_default_dtype() == torch.float32


# -- global state -----------------------------------------------------------------------------------
def _set(obj: object, attr: str, value: object) -> Callable[[], None]:
    return lambda: setattr(obj, attr, value)


B = torch.backends
#: name of a STATE entry -> what a scenario might do to it.
CHANGES: dict[str, Callable[[], object]] = {
    "default dtype": lambda: torch.set_default_dtype(torch.float64),
    "grad mode": lambda: torch.set_grad_enabled(False),
    "deterministic algorithms": lambda: torch.use_deterministic_algorithms(True, warn_only=True),
    "cudnn.enabled": _set(B.cudnn, "enabled", False),
    "cudnn.benchmark": _set(B.cudnn, "benchmark", True),
    "cudnn.deterministic": _set(B.cudnn, "deterministic", True),
    "cuda.matmul.allow_tf32": _set(B.cuda.matmul, "allow_tf32", True),
    "cuda.matmul.allow_fp16_reduced_precision_reduction":
        _set(B.cuda.matmul, "allow_fp16_reduced_precision_reduction", False),
    "cuda.matmul.allow_bf16_reduced_precision_reduction":
        _set(B.cuda.matmul, "allow_bf16_reduced_precision_reduction", False),
    "cudnn.allow_tf32": _set(B.cudnn, "allow_tf32", False),
    "float32 matmul precision": lambda: torch.set_float32_matmul_precision("medium"),
    "autocast cpu": lambda: torch.set_autocast_enabled("cpu", True),
    "autocast cuda": lambda: torch.set_autocast_dtype("cuda", torch.bfloat16),
    "autocast cache": lambda: torch.set_autocast_cache_enabled(False),
    "math sdp": lambda: B.cuda.enable_math_sdp(False),
    "cpu threads": lambda: torch.set_num_threads(torch.get_num_threads() + 1),
    "flush denormal": lambda: torch.set_flush_denormal(True),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_global_switch_is_named_and_restored(change: str) -> None:
    before = global_state()
    with pytest.raises(SideEffect) as exc:
        with isolated("s_g", "its fp32 run"):
            CHANGES[change]()
    assert global_state() == before
    msg = str(exc.value)
    assert msg.startswith("scenario s_g left global state changed after its fp32 run: ")
    # the switch is named with its old and new value (torch >= 2.9 keeps the matmul precision in fp32_precision)
    names = [n for n, _, _ in STATE]
    wanted = change if change in names else "fp32_precision"
    assert f"{wanted}" in msg and " -> " in msg, msg


def test_the_rng_is_restored_silently() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with isolated("s_rng", "its fp32 run"):
        torch.manual_seed(1234)
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected)


def test_inputs_and_state_in_one_message() -> None:
    inp = _inputs()
    with pytest.raises(SideEffect) as exc:
        with isolated("s_b", "its fp16 run", inp) as own:
            own["x"].zero_()
            torch.set_grad_enabled(False)
    msg = str(exc.value)
    assert "modified its input `x` in place" in msg and "; it also left global state changed" in msg
    assert "grad mode True -> False" in msg and torch.is_grad_enabled()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_and_cuda_inputs_are_restored() -> None:
    torch.cuda.manual_seed_all(5)
    expected = torch.rand(3, device="cuda")
    torch.cuda.manual_seed_all(5)
    inp = CaseInputs({"x": torch.arange(4.0, device="cuda")})
    with pytest.raises(SideEffect, match="`x` behind autograd's version counter"):
        with isolated("s_c", "its fp16 run", inp) as own:
            torch.rand(1000, device="cuda")
            own["x"].data.add_(1.0)
    assert torch.equal(torch.rand(3, device="cuda"), expected)
    assert inp["x"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_tf32_switch_left_on_is_seen_inside_the_strategy_s_gemm_flags(tmp_path: Path,
                                                                                  temp_scenarios: list) -> None:
    from conftest import add_scenario
    from harness.run.engine import RunConfig, run_matrix
    from harness.results import read_run
    from harness.core.scenario import Output, Scenario
    from harness.core.strategy import PRESETS

    def run(ex, inp, p):  # noqa: ANN001
        torch.backends.cuda.matmul.allow_tf32 = True  # Execution.gemm_flags would put it back: isolation sees it first
        return Output(value=(inp["x"] @ inp["x"].T).float())

    s = add_scenario(temp_scenarios, Scenario(name="c_tf32_leak", family="reduction", description="d", grid={"k": [0]},
                                              inputs=lambda p, g: {"x": torch.rand(8, 8, generator=g)}, run=run))
    before = global_state()
    out, _, _ = run_matrix(RunConfig([s], [PRESETS["fp32"], PRESETS["bf16"]], torch.device("cuda"), out=tmp_path / "r"))
    _, recs = read_run(out)
    assert [r["outcome"] for r in recs] == ["error", "error"]
    assert "cuda.matmul.allow_tf32 False -> True" in recs[0]["reason"] and global_state() == before


# -- fault injection through the command line ---------------------------------------------------------
HOSTILE = '''
import math
import torch
from harness.core.scenario import Output, Scenario, register

B = torch.backends


def _x(p, g):
    return {"x": torch.tensor([1.0, 2.0, 0.5, 0.25, 3.0, 1.5, 0.75, 4.0])}


def _mutate(ex, inp, p):
    x = inp["x"]
    how = p["how"]
    if how == "mul":
        x.mul_(1000.0)
    elif how == "optimizer":
        w = x.requires_grad_()
        opt = torch.optim.SGD([w], lr=0.25)
        (w * w).sum().backward()
        opt.step()
        x = x.detach()
    elif how == "clamp":
        with torch.no_grad():
            x.clamp_(max=1.0)
    elif how == "data":
        x.data.mul_(2.0)
    return Output(value=ex.act(x.clone()).float())


def _mutate_fp16_only(ex, inp, p):
    if ex.strategy.compute == "fp16":
        inp["x"].mul_(1000.0)
    return Output(value=ex.act(inp["x"]).float() * 1.0)


def _output(ex, inp, p):
    x = ex.act(inp["x"]).float()
    kind = p["kind"]
    if kind == "nan":
        return Output(value=torch.log(x - 10.0))          # NaN in every precision, FP64 too
    if kind == "allinf":
        return Output(value=torch.full_like(x, math.inf))
    if kind == "empty":
        return Output(value=x[:0])
    if kind == "int":
        return Output(value=(x * 4).long())
    if kind == "bool":
        return Output(value=x > 1)
    if kind == "grad_nan":
        return Output(value=x, grads={"w": x * 0 + 1.0, "b": torch.sqrt(x - 100.0)})
    if kind == "loss_nan":
        return Output(losses=[1.0, float("nan"), 0.5])
    if kind == "nothing":
        return Output()


FLAGS = {
    "default_dtype": lambda: torch.set_default_dtype(torch.float64),
    "grad_mode": lambda: torch.set_grad_enabled(False),
    "tf32": lambda: setattr(B.cuda.matmul, "allow_tf32", True),
    "cudnn_tf32": lambda: setattr(B.cudnn, "allow_tf32", False),
    "fp16_reduced": lambda: setattr(B.cuda.matmul, "allow_fp16_reduced_precision_reduction", False),
    "bf16_reduced": lambda: setattr(B.cuda.matmul, "allow_bf16_reduced_precision_reduction", False),
    "matmul_precision": lambda: torch.set_float32_matmul_precision("medium"),
    "deterministic": lambda: torch.use_deterministic_algorithms(True, warn_only=True),
    "cudnn_benchmark": lambda: setattr(B.cudnn, "benchmark", True),
    "cudnn_deterministic": lambda: setattr(B.cudnn, "deterministic", True),
    "autocast": lambda: torch.set_autocast_enabled("cpu", True),
    "threads": lambda: torch.set_num_threads(3),
    "flush_denormal": lambda: torch.set_flush_denormal(True),
}


def _flag(ex, inp, p):
    FLAGS[p["flag"]]()
    return Output(value=ex.act(inp["x"]).float() * 1.0)


def _rng(ex, inp, p):
    torch.manual_seed(99)
    return Output(value=ex.act(inp["x"] + 0 * torch.rand(8)).float())


register(Scenario(name="h_mutate", family="reduction", description="writes into its input",
                  grid={"how": ["mul", "optimizer", "clamp", "data"]}, inputs=_x, run=_mutate))
register(Scenario(name="h_mutate16", family="reduction", description="writes into its input under fp16 only",
                  grid={"k": [0]}, inputs=lambda p, g: {"x": torch.tensor([1 / 3, 2 / 3, 0.1, 7.1])},
                  run=_mutate_fp16_only))
register(Scenario(name="h_output", family="reduction", description="an output nothing can be judged on",
                  grid={"kind": ["nan", "allinf", "empty", "int", "bool", "grad_nan", "loss_nan", "nothing"]},
                  inputs=_x, run=_output))
register(Scenario(name="h_flag", family="reduction", description="leaves a global switch changed",
                  grid={"flag": list(FLAGS)}, inputs=_x, run=_flag))
register(Scenario(name="h_rng", family="reduction", description="reseeds the global RNG", grid={"k": [0]},
                  inputs=_x, run=_rng))


def _probe_inputs(p, g):
    # "shift" is drawn from the global generator, not from g: sloppy, and still reproducible per case
    return {"x": torch.randn(64, generator=g), "w": torch.randn(64, 64, generator=g), "shift": torch.rand(64)}


TINY, ONE = 5e-324, 1.0


def _probe(ex, inp, p):
    """A well-behaved scenario whose output depends on the switches above (the default dtype of new tensors,
    grad mode, autocast and oneDNN's precision for the CPU matmul, the RNG) and that reports what it sees."""
    x = ex.act(inp["x"] + inp["shift"] + torch.rand(64) * 2.0 ** -10)
    y = x @ ex.act(inp["w"]) + torch.ones(64).to(x.dtype)
    seen = {"dtype": str(torch.get_default_dtype()), "grad": torch.is_grad_enabled(),
            "autocast": torch.is_autocast_enabled("cpu"), "threads": torch.get_num_threads(),
            "tf32": B.cuda.matmul.allow_tf32, "deterministic": torch.are_deterministic_algorithms_enabled(),
            "benchmark": B.cudnn.benchmark, "flush_to_zero": TINY * ONE == 0.0,
            "onednn_matmul": B.mkldnn.matmul.fp32_precision}
    return Output(value=y.float(), extra={"seen": seen})


register(Scenario(name="h_zprobe", family="reduction", description="well-behaved: reports the state it sees",
                  grid={"k": [0, 1]}, inputs=_probe_inputs, run=_probe, n=lambda p: 64))
'''

#: Fields that measure time or memory: everything else of a record is determined by the case and the code.
TIMING_FIELDS = ("seconds", "peak_bytes")


def _run(tmp: Path, out: str, *scenarios: str) -> list[dict]:
    args = ["run", "--import", "h_hostile", "--device", "cpu", "--quiet", "--out", str(tmp / out)]
    for s in scenarios:
        args += ["--scenario", s]
    for st in ("fp32", "fp16", "bf16"):
        args += ["--strategy", st]
    res = run_cli(*args, pythonpath=tmp)
    assert res.rc == 0, res.stderr
    return read_jsonl(tmp / out / "records.jsonl")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict]]:
    """(records of every hostile scenario and then the probe, records of the probe run alone)."""
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "h_hostile.py").write_text(HOSTILE)
    return _run(tmp, "all", "h_*"), _run(tmp, "alone", "h_zprobe")


def _by(records: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["case"], r["strategy"]): r for r in records}


def test_no_hostile_scenario_passes(hostile) -> None:
    recs, _ = hostile
    bad = [r for r in recs if r["scenario"] not in ("h_zprobe", "h_rng", "h_mutate16")]
    assert len(bad) == (4 + 8 + 13) * 3
    assert [(r["case"], r["strategy"]) for r in bad if r["outcome"] == "pass"] == []
    assert {r["outcome"] for r in bad} == {"error"}
    assert all(r["margin"] is None for r in bad)


@pytest.mark.parametrize("how, said", [("mul", "`x` in place"), ("optimizer", "`x` in place, `x`'s requires_grad"),
                                       ("clamp", "`x` in place"), ("data", "`x` behind autograd's version counter")])
def test_a_scenario_writing_into_its_inputs_is_named_for_every_strategy(hostile, how: str, said: str) -> None:
    got = _by(hostile[0])
    first = got[(f"h_mutate[how={how}]", "fp32")]["reason"]
    # the reference's FP32 run made the write: the first strategy gets it, the others the cached failure
    assert first.startswith(f"SideEffect: scenario h_mutate modified its input {said}"), first
    assert "during its fp32 run" in first
    for st in ("fp16", "bf16"):
        r = got[(f"h_mutate[how={how}]", st)]["reason"]
        assert r.startswith("RuntimeError: the reference of this case failed: SideEffect: scenario h_mutate "
                            f"modified its input {said}"), r


def test_a_write_under_one_strategy_fails_that_one_and_no_other(hostile) -> None:
    got = _by(hostile[0])
    assert got[("h_mutate16[k=0]", "fp16")]["reason"].startswith(
        "SideEffect: scenario h_mutate16 modified its input `x` in place during its fp16 run")
    fp32, bf16 = got[("h_mutate16[k=0]", "fp32")], got[("h_mutate16[k=0]", "bf16")]
    assert (fp32["outcome"], fp32["metrics"]["rel_err"]) == ("pass", 0.0)
    # bf16 ran after fp16's write, from restored inputs: its error is BF16's rounding of x, nothing more
    x = torch.tensor([1 / 3, 2 / 3, 0.1, 7.1])
    want = float((x.bfloat16().double() - x.double()).norm()) / float(x.double().norm())
    assert want > 2.0**-12 and bf16["outcome"] == "pass" and bf16["metrics"]["rel_err"] == want


@pytest.mark.parametrize("kind, said", [
    ("nan", "reference not finite under FP32 and FP64: value: 8 of 8 entries inf/NaN (first at (0,): nan)"),
    ("allinf", "reference not finite under FP32 and FP64: value: 8 of 8 entries inf/NaN (first at (0,): inf)"),
    ("grad_nan", "reference not finite under FP32 and FP64: gradient b: 8 of 8 entries inf/NaN (first at (0,): nan)"),
    ("loss_nan", "reference not finite under FP32 and FP64: loss at step 1 of 3 (nan)"),
    ("empty", "the reference output cannot be judged: value has no entries (shape (0,))"),
    ("int", "the reference output cannot be judged: value has dtype torch.int64: only real floating-point"),
    ("bool", "the reference output cannot be judged: value has dtype torch.bool: only real floating-point"),
    ("nothing", "the reference output cannot be judged: it holds no value, gradients or loss curve"),
])
def test_an_output_nothing_can_be_judged_on_is_an_error_for_every_strategy(hostile, kind: str, said: str) -> None:
    got = _by(hostile[0])
    for st in ("fp32", "fp16", "bf16"):
        r = got[(f"h_output[kind={kind}]", st)]
        assert r["outcome"] == "error" and r["reason"].startswith(said), r["reason"]
        assert r["metrics"] == {} and "traceback" not in r


def test_each_changed_global_switch_is_an_error_that_names_it(hostile) -> None:
    got = _by(hostile[0])
    names = {"default_dtype": "default dtype torch.float32 -> torch.float64", "grad_mode": "grad mode True -> False",
             "tf32": "cuda.matmul.fp32_precision none -> tf32", "cudnn_tf32": "cudnn.allow_tf32 True -> False",
             "deterministic": "deterministic algorithms (False, False) -> (True, True)",
             "cudnn_benchmark": "cudnn.benchmark False -> True", "threads": "cpu threads 1 -> 3",
             "autocast": "autocast cpu (False, torch.bfloat16) -> (True, torch.bfloat16)",
             "flush_denormal": "flush denormal False -> True",
             "matmul_precision": "mkldnn.matmul.fp32_precision none -> bf16"}
    for flag in ("default_dtype", "grad_mode", "tf32", "cudnn_tf32", "fp16_reduced", "bf16_reduced", "matmul_precision",
                 "deterministic", "cudnn_benchmark", "cudnn_deterministic", "autocast", "threads", "flush_denormal"):
        r = got[(f"h_flag[flag={flag}]", "fp32")]["reason"]
        assert r.startswith("SideEffect: scenario h_flag left global state changed after its fp32 run: "), r
        if flag in names:
            assert names[flag] in r, r


def test_a_well_behaved_scenario_is_the_same_alone_and_after_the_hostile_ones(hostile) -> None:
    recs, alone = hostile
    after = [r for r in recs if r["scenario"] == "h_zprobe"]
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING_FIELDS}  # noqa: E731
    assert len(after) == len(alone) == 6
    # case by case: with several workers the records' order is the order cases finish in
    assert {k: strip(r) for k, r in _by(after).items()} == {k: strip(r) for k, r in _by(alone).items()}
    assert alone[0]["metrics"]["seen"] == {"dtype": "torch.float32", "grad": True, "autocast": False, "threads": 1,
                                           "tf32": False, "deterministic": False, "benchmark": False,
                                           "flush_to_zero": False, "onednn_matmul": "none"}
    assert {r["outcome"] for r in alone} == {"pass"}
    # the RNG-reseeding scenario passes (drawing random numbers is no bug) and leaks nothing either
    assert {r["outcome"] for r in recs if r["scenario"] == "h_rng"} == {"pass"}


def _other(value: object) -> object:
    """A value of a STATE switch other than ``value``: the other bool, another TF32 setting, another pair."""
    if isinstance(value, bool):
        return not value
    if value in ("none", "ieee"):
        return "tf32"
    if value == "tf32":
        return "ieee"
    if isinstance(value, tuple) and isinstance(value[0], bool):
        return (not value[0], *value[1:])
    return None


@pytest.mark.parametrize("name", [n for n, _, _ in STATE])
def test_every_switch_of_the_table_is_restored_after_a_change(name: str) -> None:
    get, put = next((g, p) for n, g, p in STATE if n == name)
    value = get()
    special = {"default dtype": lambda: torch.float64, "cpu threads": lambda: value + 1,
               "float32 matmul precision": lambda: "medium"}
    new = special[name]() if name in special else _other(value)
    assert new is not None and new != value
    before = global_state()
    with pytest.raises(SideEffect, match=f"{name} "):
        with isolated("s_t", "its fp32 run"):
            put(new)
    assert global_state() == before


def test_the_reference_perturbed_runs_are_isolated_too() -> None:
    """FP32's one-ulp perturbed runs (a training scenario's ``perturbed``) go through ``Scenario.execute``
    like every other run: a write into the inputs there is a SideEffect, restored, and its run is named."""
    from harness.core.execution import Execution
    from harness.core.scenario import Output, Scenario
    from harness.core.strategy import PRESETS

    def perturbed(ex, inputs, params, k):
        inputs["x"].add_(k)
        return Output(value=inputs["x"].clone())

    s = Scenario(name="perturb_writes", family="training", description="d", grid={}, inputs=lambda p, g: {},
                 run=lambda ex, inputs, params: Output(value=inputs["x"].clone()), perturbed=perturbed)
    x = torch.tensor([1.5, -2.25])
    ex = Execution(PRESETS["fp32"], torch.device("cpu"))
    assert torch.equal(s.execute(ex, {"x": x}, {}).value, x)
    with pytest.raises(SideEffect, match=r"`x` in place during its fp32 run \(perturbed 3\)"):
        s.execute(ex, {"x": x}, {}, perturb=3)
    assert torch.equal(x, torch.tensor([1.5, -2.25]))  # restored
    plain = Scenario(name="no_perturbed", family="training", description="d", grid={}, inputs=lambda p, g: {},
                     run=lambda ex, inputs, params: Output(value=inputs["x"]))
    with pytest.raises(ValueError, match="declares no perturbed run"):
        plain.execute(ex, {"x": x}, {}, perturb=0)
