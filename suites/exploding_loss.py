"""``exploding_loss`` family: values past FP16's maximum, 65504, in the loss or in scaled gradients."""
from __future__ import annotations

import torch

from harness.scenario import Expect, Output, Scenario, register
from harness.training import Trainer

from ._models import Probe


def _inputs(p: dict, g: torch.Generator) -> dict:
    b, k, m = 16, 64, 32
    return {"x": torch.randn(b, k, generator=g), "w": torch.randn(k, m, generator=g) / 8}


def _loss_past_max_run(ex, inp: dict, p: dict) -> Output:
    """loss = sum(y) * 2^log2_loss / |sum(y)|-ish: the loss is reduced in the activation format, so a
    value past the format's max is inf whatever the scaler does (gradients stay finite)."""
    model = Probe(inp["w"], ex)
    trainer = Trainer(ex, model)
    target = 2.0 ** p["log2_loss"]

    def loss_fn(mod, batch):
        (x,) = batch
        y = mod(x)
        # a sum-of-squares loss reduced in the activation format, scaled to reach `target`
        return (y * y * (target / 512.0)).sum()

    res = trainer.train(loss_fn, lambda i: (inp["x"],), steps=1)
    return Output(value=torch.tensor(res.losses[:1]), grads=res.first_grads, losses=res.losses)


register(Scenario(
    name="loss_past_fp16_max",
    family="exploding_loss",
    description=("A sum-of-squares loss reduced in the compute format with value ~2^log2_loss. Past 65504 "
                 "(2^16) it is inf in FP16 with or without loss scaling: scaling acts on gradients, not on "
                 "a loss that already overflowed. BF16 keeps FP32's range."),
    grid={"log2_loss": [12, 17, 20, 24]},
    quick={"log2_loss": [17, 20]},
    inputs=_inputs,
    run=_loss_past_max_run,
    n=lambda p: 512,
    expect=(Expect(("fp16*",), "overflow", "loss past 65504 in FP16", when=lambda p: p["log2_loss"] >= 17),),
))


def _scaled_run(ex, inp: dict, p: dict) -> Output:
    """Gradients of magnitude ~2^log2_grad: fine in FP16 as they are, but times the initial loss scale
    2^16 they pass 65504, so a dynamic scaler must back off (skipping those steps) before it trains."""
    model = Probe(inp["w"], ex)
    trainer = Trainer(ex, model, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0))
    weight = 2.0 ** p["log2_grad"] / 4.0

    def loss_fn(mod, batch):
        (x,) = batch
        return mod(x).float().sum() * weight

    res = trainer.train(loss_fn, lambda i: (inp["x"],), steps=p["steps"])
    return Output(grads=res.first_grads, losses=res.losses,
                  trace=res.trace if ex.strategy.scaler.kind != "none" else None)


register(Scenario(
    name="scaled_grad_overflow",
    family="exploding_loss",
    description=("Gradients of ~2^log2_grad that FP16 holds, but whose scaled values S*g overflow at the "
                 "initial scale 2^16. Dynamic scalers back off and skip those steps (counted in the record); "
                 "a static scale that overflows skips every step and training stalls."),
    grid={"log2_grad": [2, 6, 10], "steps": [16, 64]},
    quick={"log2_grad": [6, 10], "steps": [16]},
    inputs=_inputs,
    run=_scaled_run,
    n=lambda p: 16,
    expect=(Expect(("fp16-static",), "stalled", "S*g = 2^(10+log2_grad+4) > 65504 on every step",
                   when=lambda p: p["log2_grad"] >= 6),),
))
