"""``tiny_gradient`` family: gradients below FP16's smallest subnormal (2^-24) flush to zero unless
the loss is scaled up first."""
from __future__ import annotations

import torch

from harness.scenario import Expect, Output, Scenario, register
from harness.training import Trainer

from ._models import Probe


def _sweep_inputs(p: dict, g: torch.Generator) -> dict:
    b, k, m = 8, 64, 64
    return {"x": torch.randn(b, k, generator=g), "w": torch.randn(k, m, generator=g) / 8,
            "t": torch.randn(b, m, generator=g)}


def _sweep_run(ex, inp: dict, p: dict) -> Output:
    """One training step of y = x @ w with loss 2^e * sum(y * t): dL/dy = 2^e * t reaches the
    low-precision backward pass, and dL/dw = x^T dL/dy has magnitudes around 2^e * sqrt(8)."""
    weight = 2.0 ** p["log2_grad"]
    model = Probe(inp["w"], ex)
    trainer = Trainer(ex, model)

    def loss_fn(mod, batch):
        x, t = batch
        return (mod(x).float() * t.float()).sum() * weight

    res = trainer.train(loss_fn, lambda i: (inp["x"], inp["t"]), steps=1)
    return Output(grads=res.first_grads, losses=res.losses, trace=res.trace if ex.strategy.scaler.kind != "none" else None)


register(Scenario(
    name="grad_magnitude_sweep",
    family="tiny_gradient",
    description=("Weight gradients of magnitude ~2^log2_grad produced by a real backward pass. Without loss "
                 "scaling FP16 flushes everything below 2^-24 and loses precision in its subnormal range "
                 "(2^-24..2^-14); a scale of 2^16 lifts them back; BF16 has FP32's range."),
    grid={"log2_grad": [-8, -16, -20, -24, -28, -32, -40]},
    quick={"log2_grad": [-16, -28, -32]},
    inputs=_sweep_inputs,
    run=_sweep_run,
    n=lambda p: 8,
    expect=(
        Expect(("fp16",), "underflow", "gradients below 2^-24 flush to zero without loss scaling",
               when=lambda p: p["log2_grad"] <= -28),
        Expect(("fp16",), "diverged", "gradients in FP16's subnormal range keep few bits",
               when=lambda p: -28 < p["log2_grad"] <= -16),
        Expect(("fp16-static",), "underflow", "a static scale of 2^10 cannot lift gradients below 2^-34",
               when=lambda p: p["log2_grad"] <= -40),
        Expect(("fp16-static",), "diverged", "a static scale of 2^10 leaves them subnormal",
               when=lambda p: -40 < p["log2_grad"] <= -26),
        Expect(("fp16-dynamic", "fp16-gradscaler", "fp16-pure", "fp16-master"), "underflow",
               "at 2^-40 even the initial scale 2^16 leaves them below 2^-24", when=lambda p: p["log2_grad"] <= -40),
    ),
))
