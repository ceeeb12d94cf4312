"""Your own scenarios, registered from your own module: a complete example.

Nothing in the project is edited. Put a module like this one anywhere on the Python path and name it
with ``--import``::

    PYTHONPATH=examples python -m harness list --import my_scenarios
    PYTHONPATH=examples python -m harness run --import my_scenarios --scenario 'my_*' --device cpu

Each ``register(Scenario(...))`` call adds one scenario: a name (unique across the registry), one of
the fixed families, a description that says what it demonstrates, a parameter grid (``quick``
overrides it for the default tier), ``inputs`` that build FP32 CPU tensors from a seeded generator,
``run`` that computes under the strategy's :class:`~harness.core.execution.Execution`, the length ``n`` of
its chain of roundings in the compute format (the error bound grows with it), and the failures it
expects, with reasons. See docs/own_scenarios.md.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.core.execution import Execution, route_linears
from harness.core.scenario import Expect, Output, Scenario, register
from harness.run.training import Trainer


# -- 1. a hand-written op: logsumexp without the max shift ---------------------------------------
def _lse_inputs(p: dict, g: torch.Generator) -> dict:
    """Everything random comes from ``g``: the same inputs on every device and for every strategy."""
    return {"x": p["shift"] + torch.randn(16, p["n"], generator=g)}


def _lse_run(ex: Execution, inp: dict, p: dict) -> Output:
    """log(sum(exp(x))) per row, as a user might write it, in the strategy's precision. ``ex.act`` hands
    the input over as a previous layer would (rounded to the activation format); ``ex.autocast()`` is the
    forward region."""
    x = ex.act(inp["x"])
    with ex.autocast():
        y = torch.log(torch.exp(x).sum(dim=-1))
    return Output(value=y.float())


register(Scenario(
    name="my_naive_logsumexp",
    family="reduction",
    description=("log(sum(exp(x))) without subtracting the row maximum first, over rows of n logits around "
                 "`shift`. In FP16 exp(x) is inf past x = 11.09 (e^11.09 = 65504), and the row sum of n of them, "
                 "about 1.65*n*e^shift, passes 65504 even sooner: with shift 16 every FP16 strategy returns "
                 "inf, loss scaling or not. BF16 and the FP8 recipes (BF16 activations) keep FP32's range."),
    grid={"n": [1024, 8192], "shift": [0.0, 16.0]},
    quick={"n": [1024], "shift": [0.0, 16.0]},
    inputs=_lse_inputs,
    run=_lse_run,
    n=lambda p: 3,  # x, exp(x) and the result are rounded; torch sums FP16/BF16 in FP32
    expect=(
        Expect(("fp16", "fp16-*"), "overflow", "exp(x) > 65504 for x > 11.09: inf in FP16",
               when=lambda p: p["shift"] >= 16),
    ),
))


# -- 2. a small model trained a few steps ---------------------------------------------------------
def _mlp_inputs(p: dict, g: torch.Generator) -> dict:
    d = p["width"]
    return {"x": torch.randn(64, 32, generator=g), "y": torch.randn(64, 1, generator=g),
            "w1": torch.randn(d, 32, generator=g) / 32**0.5, "w2": torch.randn(1, d, generator=g) / d**0.5}


def _mlp_run(ex: Execution, inp: dict, p: dict) -> Output:
    """Ten AdamW steps of a GELU MLP through the harness's Trainer: loss scaling, GradScaler, master
    weights and skipped steps all follow the strategy. The initial weights come from ``inputs``, so
    every strategy starts from the same point."""
    model = nn.Sequential(nn.Linear(32, p["width"], bias=False), nn.GELU(), nn.Linear(p["width"], 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(inp["w1"])
        model[2].weight.copy_(inp["w2"])
    route_linears(model, ex)  # FP8 and CPU-emulated TF32 GEMMs go through ex.linear
    trainer = Trainer(ex, model, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3))

    def loss_fn(mod: nn.Module, batch: tuple) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(mod(x).float(), y.float())

    res = trainer.train(loss_fn, lambda step: (inp["x"], inp["y"]), steps=10)
    return Output(grads=res.first_grads, losses=res.losses, trace=res.trace)


register(Scenario(
    name="my_mlp_adamw",
    family="training",
    description=("A two-layer GELU MLP trained 10 AdamW steps on a regression batch. Every strategy follows "
                 "FP32's loss curve within its bound, except pure FP16: AdamW's state is FP16 too, small "
                 "second moments flush to zero and eps = 1e-8 rounds to 0, so the first step writes inf "
                 "into the weights and every later step overflows and is skipped."),
    grid={"width": [64, 256]},
    quick={"width": [64]},
    inputs=_mlp_inputs,
    run=_mlp_run,
    n=lambda p: 32,  # the longest inner product of the forward and backward passes
    expect=(
        Expect(("fp16-pure",), "stalled", "AdamW in FP16: v = 0 and eps -> 0 make the first update inf; every "
                                          "later step overflows and is skipped"),
    ),
))
