"""The training step: underflow and its cure by loss scaling, the real GradScaler, skips, master weights."""
from __future__ import annotations

import math

import pytest
import torch

from harness.core.execution import Execution
from harness.core.strategy import PRESETS, parse
from harness.run.training import Trainer

CPU = torch.device("cpu")
ONE = torch.ones(1, 1)


class Lin(torch.nn.Module):
    """y = x @ w through the strategy's GEMM (a 1x1 weight: its gradient is x^T dL/dy)."""

    def __init__(self, ex: Execution, w: float = 1.0) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((1, 1), w))
        self.ex = ex

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ex.matmul(x, self.w)


def _weighted(mod: torch.nn.Module, batch: tuple) -> torch.Tensor:
    """loss = weight * y, computed in FP32 after the low-precision GEMM: dL/dy = weight."""
    x, weight = batch
    return (mod(x).float() * weight.float()).sum()


def _grad_of_one_step(strategy: str, weight: float) -> float:
    ex = Execution(parse(strategy), CPU)
    tr = Trainer(ex, Lin(ex))
    _, grads, _ = tr.step(_weighted, (ONE, torch.tensor([weight])))
    return grads["w"].item()


@pytest.mark.parametrize("strategy,expected", [("fp16", 0.0), ("compute=fp16,scaler=static(2^16)", 2.0**-30),
                                               ("fp32", 2.0**-30), ("bf16", 2.0**-30)])
def test_a_2_pow_minus_30_gradient(strategy: str, expected: float) -> None:
    # fp16 without scaling flushes dL/dy = 2^-30 (below 2^-24) to zero in the backward GEMM; times 2^16
    # it is 2^-14, FP16's smallest normal, exact, and unscaling in FP32 gives back 2^-30 exactly
    assert _grad_of_one_step(strategy, 2.0**-30) == expected


GS = "compute=fp16,scaler=gradscaler(init=2^16,growth=2,backoff=0.5,interval=2)"
OURS = "compute=fp16,scaler=dynamic(init=2^16,growth=2,backoff=0.5,interval=2)"


def _train(strategy: str, batches, steps: int, lr: float = 2.0**-4) -> tuple[Trainer, object]:
    ex = Execution(parse(strategy), CPU)
    tr = Trainer(ex, Lin(ex), optimizer=lambda ps: torch.optim.SGD(ps, lr=lr))
    return tr, tr.train(_weighted, batches, steps)


def test_gradscaler_strategy_drives_torch_gradscaler_with_its_semantics() -> None:
    # dL/dy = 1: at S = 2^16 the scaled gradient 65536 is inf in FP16, at 2^15 it is finite, and after
    # `interval` = 2 good steps the scale grows back: overflow, back off, two good steps, grow, ...
    tr, res = _train(GS, lambda i: (ONE, torch.ones(1)), steps=7)
    assert isinstance(tr.scaler.gs, torch.amp.GradScaler)
    t = res.trace
    assert t.scales == [2.0**16, 2.0**15, 2.0**15, 2.0**16, 2.0**15, 2.0**15, 2.0**16]
    assert t.found_inf == t.skipped == [True, False, False, True, False, False, True]
    assert t.events == ["backoff", "hold", "grow", "backoff", "hold", "grow", "backoff"]
    assert tr.scaler.scale == 2.0**15  # torch's own state after the last update
    assert tr.model.w.item() == 1 - 4 * 2.0**-4  # four steps applied, three skipped
    # our dynamic scaler with the same policy makes exactly the same decisions
    _, ours = _train(OURS, lambda i: (ONE, torch.ones(1)), steps=7)
    assert (ours.trace.scales, ours.trace.skipped, ours.trace.events) == (t.scales, t.skipped, t.events)


@pytest.mark.parametrize("scaler", ["dynamic(init=4,growth=2,backoff=0.5,interval=100)",
                                    "gradscaler(init=4,growth=2,backoff=0.5,interval=100)"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("pos", range(4))
def test_a_non_finite_gradient_at_every_step_is_skipped(scaler: str, bad: float, pos: int) -> None:
    steps = 4
    weights = lambda i: (ONE, torch.tensor([bad if i == pos else 1.0]))  # noqa: E731
    tr, res = _train(f"compute=fp32,scaler={scaler}", weights, steps)
    t = res.trace
    assert t.found_inf == t.skipped == [i == pos for i in range(steps)]
    assert t.scales == [4.0] * (pos + 1) + [2.0] * (steps - pos - 1)
    assert tr.model.w.item() == 1 - (steps - 1) * 2.0**-4  # the bad step left the weight alone
    assert math.isnan(res.losses[pos]) == math.isnan(bad) and all(math.isfinite(v) for i, v in enumerate(res.losses)
                                                                   if i != pos)
    # the gradients reported are those of the first applied step
    assert res.first_grads["w"].item() == 1.0


def test_a_scaler_that_raises_at_its_floor_ends_training_on_record() -> None:
    tr, res = _train("compute=fp32,scaler=dynamic(init=2,min=1,interval=100,floor=raise)",
                     lambda i: (ONE, torch.tensor([math.inf])), steps=5)
    # step 0 overflows at 2 and backs off to the floor 1; step 1 overflows at the floor and raises
    assert res.trace.scales == [2.0] and res.stopped.startswith("step 1: gradient overflow at the minimum loss scale 1")
    assert res.trace.raised and len(res.losses) == 1 and tr.model.w.item() == 1.0


def test_master_weights_keep_an_update_that_pure_fp16_loses() -> None:
    # w = 2048, dw = -0.5, lr = 1: 2048.5 is the tie between 2048 (even) and 2050 in FP16: pure FP16 never
    # moves; the FP32 master reaches 2050 after four steps, and the FP16 copy follows it exactly
    def run(name: str) -> Trainer:
        ex = Execution(PRESETS[name], CPU)
        tr = Trainer(ex, Lin(ex, w=2048.0), optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
        loss = lambda m, b: (m.w.float() * b[0].float()).sum()  # noqa: E731  dL/dw = -0.5
        res = tr.train(loss, lambda i: (torch.tensor([[-0.5]]),), steps=4)
        assert res.trace.skipped == [False] * 4  # the loss scale 2^16 times 0.5 is finite in FP16
        return tr

    pure, master = run("fp16-pure"), run("fp16-master")
    assert pure.model.w.dtype == torch.float16 and pure.model.w.item() == 2048.0
    assert master.model.w.dtype == torch.float16 and master.model.w.item() == 2050.0
    assert master.master[0].dtype == torch.float32 and master.parameters_fp32()["w"].item() == 2050.0


def test_gradscaler_with_master_weights_is_refused_when_parsed() -> None:
    with pytest.raises(ValueError, match="cannot drive master weights"):
        parse("compute=fp16,apply=cast,params=fp16,master=yes,scaler=gradscaler(init=2^4)")
