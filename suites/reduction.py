"""``reduction`` family: long reductions whose rounding error grows with their length or is amplified
by cancellation (softmax, layer norm, batch-norm statistics, long sums)."""
from __future__ import annotations

import torch

from harness.scenario import Expect, Output, Scenario, register


# -- softmax over long rows with large logits ---------------------------------------------------
def _softmax_inputs(p: dict, g: torch.Generator) -> dict:
    return {"x": torch.randn(4, p["n"], generator=g) * p["scale"]}


def _softmax_run(ex, inp: dict, p: dict) -> Output:
    x = ex.act(inp["x"])
    with ex.autocast():
        y = torch.softmax(x, dim=-1)
    return Output(value=y.float())


register(Scenario(
    name="softmax_long",
    family="reduction",
    description=("Softmax over rows of n logits with standard deviation `scale`. The logits arrive in the "
                 "compute format (as a GEMM hands them over), so their rounding error, |x|*u, becomes a "
                 "relative error of the probabilities: FP16 and BF16 fail once logits reach tens; tiny "
                 "probabilities flush to zero in FP16."),
    grid={"n": [1024, 16384, 65536], "scale": [1.0, 10.0, 100.0, 1000.0]},
    quick={"n": [4096], "scale": [1.0, 30.0, 1000.0]},
    inputs=_softmax_inputs,
    run=_softmax_run,
    n=lambda p: 2,  # torch accumulates the row sum in FP32: the input and the output are rounded
    expect=(
        Expect(("fp16*", "bf16*", "fp8*"), "diverged", "logit rounding error |x|*u exceeds the bound",
               when=lambda p: p["scale"] >= 10),
    ),
))


# -- layer norm with a large mean -----------------------------------------------------------------
def _ln_inputs(p: dict, g: torch.Generator) -> dict:
    return {"x": p["offset"] + torch.randn(8, p["n"], generator=g)}


def _ln_run(ex, inp: dict, p: dict) -> Output:
    x = ex.act(inp["x"])
    with ex.autocast():
        y = torch.nn.functional.layer_norm(x, (p["n"],))
    return Output(value=y.float())


register(Scenario(
    name="layernorm_offset",
    family="reduction",
    description=("Layer norm of rows with mean `offset` and unit spread. Rounding the input to the compute "
                 "format loses offset*u of the signal before normalisation removes the offset, so the "
                 "normalised output's error grows with offset/std: FP16 fails past offsets of ~10, BF16 "
                 "sooner."),
    grid={"n": [1024, 8192], "offset": [0.0, 10.0, 100.0, 1000.0]},
    quick={"n": [1024], "offset": [0.0, 100.0, 1000.0]},
    inputs=_ln_inputs,
    run=_ln_run,
    n=lambda p: 4,  # input, mean, variance and output roundings; the sums accumulate in FP32
    expect=(Expect(("fp16*", "bf16*", "fp8*"), "diverged", "offset*u exceeds the bound", when=lambda p: p["offset"] >= 100),),
))


# -- batch-norm statistics -------------------------------------------------------------------------
def _bn_inputs(p: dict, g: torch.Generator) -> dict:
    return {"x": p["offset"] + torch.randn(p["batch"], 16, 8, 8, generator=g)}


def _bn_run(ex, inp: dict, p: dict) -> Output:
    x = ex.act(inp["x"])
    with ex.autocast():
        var = torch.var(x, dim=(0, 2, 3), unbiased=False)
    return Output(value=var.float())


register(Scenario(
    name="batchnorm_stats",
    family="reduction",
    description=("Per-channel batch variance of activations with mean `offset` over batch*64 values. "
                 "Rounding shifted activations to the compute format adds ~(offset*u)^2/3 of noise to a unit "
                 "variance: FP16 fails past offsets of ~30, BF16 past ~3."),
    grid={"batch": [32, 256], "offset": [0.0, 3.0, 30.0, 300.0]},
    quick={"batch": [64], "offset": [0.0, 30.0]},
    inputs=_bn_inputs,
    run=_bn_run,
    n=lambda p: 2,  # the input and the output are rounded; torch accumulates in FP32
    expect=(Expect(("fp16*", "bf16*", "fp8*"), "diverged", "variance error offset*u/std",
                   when=lambda p: p["offset"] >= 300),),
))


# -- long sum in the compute format ----------------------------------------------------------------
def _sum_inputs(p: dict, g: torch.Generator) -> dict:
    x = torch.rand(p["n"], generator=g)
    if p["data"] == "zero_mean":
        x = x - 0.5
    return {"x": x}


def _sum_run(ex, inp: dict, p: dict) -> Output:
    """Running sum in the activation format, 256 terms at a time (a metric or loss accumulator kept in
    low precision): each block is summed by torch (FP32 inside), then added to the running total."""
    x = ex.act(inp["x"]).reshape(-1, 256)
    with ex.autocast():
        blocks = x.sum(dim=1)
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        for b in blocks:
            total = total + b
    ref = inp["x"].double()
    kappa = float(ref.abs().sum() / ref.sum().abs().clamp_min(1e-300))
    return Output(value=total.float().reshape(1), kappa=kappa)


register(Scenario(
    name="sum_long",
    family="reduction",
    description=("Sum of n values accumulated in the compute format 256 at a time. Same-sign data: the "
                 "total grows and each addition loses up to |total|*u, so BF16 and FP16 drift (and FP16 "
                 "stagnates once total/2^11 exceeds a block). Zero-mean data: errors cancel; the bound "
                 "scales with the condition number sum|x|/|sum x|."),
    grid={"n": [2**12, 2**16, 2**20, 2**24], "data": ["same_sign", "zero_mean"]},
    quick={"n": [2**16, 2**20]},
    inputs=_sum_inputs,
    run=_sum_run,
    n=lambda p: p["n"] // 256 + 1,
    expect=(Expect(("fp16*", "bf16*", "fp8*"), "diverged", "running total rounded every block",
                   when=lambda p: p["data"] == "same_sign" and p["n"] >= 2**16),),
))
