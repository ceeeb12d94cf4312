"""The ``training`` family and the training run it shares with check-model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.run.engine import run_case
from harness.run.reference import ReferenceCache
from harness.core.scenario import Case, discover, seed_generator
from harness.core.strategy import PRESETS, parse
from harness.models.user_model import ModelSpec, chain_length, train_trajectory

CPU = torch.device("cpu")
NAMES = ("train_mlp", "train_cnn", "train_transformer")


@pytest.fixture(scope="module")
def registry():
    return discover()


def test_three_scenarios_in_the_family(registry) -> None:
    scenarios = {s.name: s for s in registry.select([], ["training"])}
    assert set(NAMES) <= set(scenarios)
    for name in NAMES:
        s = scenarios[name]
        quick, full = s.params("quick"), s.params("full")
        assert max(p["steps"] for p in quick) < min(p["steps"] for p in full)
        assert s.tolerance is not None and "random walk" in s.tolerance.reason


def test_chain_length_counts_parameterised_layers(registry) -> None:
    from suites.training import DEPTH
    assert DEPTH == {"mlp": 3, "cnn": 5, "transformer": 16}
    assert registry.get("train_mlp").n({"steps": 16, "lr": 0.01}) == 16 * (2 * 3 + 1) == chain_length(3, 16)
    assert registry.get("train_transformer").n({"steps": 128}) == 128 * 33


# -- the training run ------------------------------------------------------------------------------
def _one_weight(value: float, loss_weight: float = 1.0, lr: float = 2.0**-10) -> ModelSpec:
    """y = w*x with x = 1 and loss = loss_weight * y: every update is exactly lr * loss_weight."""
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(value)
    x = torch.ones(1, 1)
    return ModelSpec("one", lin, lambda i: (x,), lambda m, b: m(b[0]).float().sum() * loss_weight,
                     lambda ps: torch.optim.SGD(ps, lr=lr))


def test_update_below_half_an_ulp_is_lost_in_bf16_weights() -> None:
    """w = 1, dw = 2^-10: BF16's spacing below 1 is 2^-8, so 1 - 2^-10 rounds back to 1 (w + dw == w)."""
    spec = _one_weight(1.0)
    pure = train_trajectory(_ex("bf16-pure"), spec, 4)
    master = train_trajectory(_ex("bf16-master"), spec, 4)
    assert float(pure.value) == 0.0 and pure.extra["updates_lost"] == 1.0
    assert float(master.value) == -4 * 2.0**-10 and master.extra["updates_lost"] == 0.0


def _ex(name: str):
    from harness.core.execution import Execution
    return Execution(parse(name) if "=" in name else PRESETS[name], CPU)


def test_a_skipped_step_is_retried_on_the_same_batch() -> None:
    """S * dL/dy reaches FP16's 65520 for S >= 2^16: from 2^20 the scaler skips 5 attempts, then trains.
    At most 2*steps attempts are made: with 3 steps the run would stop after one update."""
    seen: list[int] = []  # the step whose batch each attempt's loss saw
    drawn: list[int] = []  # the steps batch() was called for: once each, the draw is kept for retries
    spec = _one_weight(0.5)
    spec = ModelSpec(spec.name, spec.model, lambda i: (drawn.append(i), torch.ones(1, 1), i)[1:],
                     lambda m, b: (seen.append(b[1]), m(b[0]).float().sum())[1], spec.optimizer)
    out = train_trajectory(_ex("compute=fp16,scaler=dynamic(init=2^20,interval=1000)"), spec, 6)
    assert seen == [0] * 6 + [1, 2, 3, 4, 5] and drawn == [0, 1, 2, 3, 4, 5]
    assert out.trace is not None and out.trace.skipped == [True] * 5 + [False] * 6
    assert out.trace.scales == [2.0**k for k in (20, 19, 18, 17, 16)] + [2.0**15] * 6
    assert len(out.losses) == 6 and out.extra["updates"] == 6 and out.extra["attempts"] == 11
    assert float(out.grads["weight"]) == 1.0  # the first applied update's unscaled gradient
    seen.clear()
    capped = train_trajectory(_ex("compute=fp16,scaler=dynamic(init=2^20,interval=1000)"), spec, 3)
    assert drawn == [0, 1, 2, 3, 4, 5] and seen == [0] * 6  # batches drawn once serve every later run
    assert capped.extra["attempts"] == 6 and capped.extra["updates"] == 1  # 5 of 6 skipped: stalled


def test_a_fixed_scale_stops_at_the_first_overflow() -> None:
    spec = _one_weight(0.5, loss_weight=2.0**17)  # dL/dy = 2^17 is inf in FP16; retrying cannot change it
    out = train_trajectory(_ex("compute=fp16,scaler=static(1)"), spec, 4)
    assert out.extra["attempts"] == 1 and out.extra["updates"] == 0
    assert "fixed loss scale" in out.extra["stopped"]
    assert not torch.isfinite(out.grads["weight"]).all()
    plain = train_trajectory(_ex("fp16"), spec, 4)  # no scaler, no check: the inf update is applied
    assert plain.extra["attempts"] == 4 and not torch.isfinite(plain.value).all()


def test_runs_start_from_the_same_weights() -> None:
    spec = _one_weight(0.75)
    a, b = train_trajectory(_ex("fp32"), spec, 2), train_trajectory(_ex("fp32"), spec, 2)
    assert torch.equal(a.value, b.value) and float(spec.model.weight.detach()) == 0.75  # the user's model is untouched


# -- the scenarios' declared outcomes on the quick tier ---------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_quick_tier_outcomes(registry, name: str) -> None:
    """FP32 passes; each declared expected failure happens; master weights fix what pure BF16 loses."""
    s = registry.get(name)
    (params,) = s.params("quick")
    case = Case(s, params, 0)
    inputs = s.inputs(params, seed_generator(case))
    refs = ReferenceCache()
    declared = {st for e in s.expect for st in e.strategies if e.applies(st, params, "cpu")}
    for label in ["fp32", "bf16-master", *sorted(declared)]:
        rec, _ = run_case(case, PRESETS[label], CPU, inputs, refs)
        exp = s.expected(label, params, "cpu")
        assert rec["outcome"] == (exp.outcome if exp else "pass"), (label, rec["reason"])
        if exp is None:
            assert rec["metrics"]["loss_steps"] == params["steps"] and rec["metrics"]["updates"] == params["steps"]


# -- lost updates in the verdict ---------------------------------------------------------------------
def test_lost_updates_beyond_the_reference_diverge() -> None:
    """compare() subtracts the reference's absorbed share; judge() fails the excess over the budget."""
    from harness.values.formats import FORMATS
    from harness.judge.metrics import compare
    from harness.core.scenario import Output
    from harness.judge.verdict import judge
    delta = torch.tensor([1.0, -0.5])
    m = compare(Output(value=delta, extra={"updates_lost": 0.75}), Output(value=delta, extra={"updates_lost": 0.25}),
                FORMATS["bf16"])
    assert m["updates_lost_excess"] == 0.5 and m["rel_err"] == 0.0
    m["updates_lost"] = 0.75  # the engine merges the candidate's extra into its metrics
    v = judge(m, FORMATS["bf16"], n=10)
    assert v.outcome == "diverged" and v.reason.startswith("updates: 75% of (update, weight) pairs")
    assert judge({"updates_lost": 0.25, "updates_lost_excess": 0.0078125, "rel_err": 0.0},
                 FORMATS["bf16"], n=10).outcome == "pass"  # 2^-7 < the 1% budget: FP32 loses as many
