"""``tiny_gradient`` family: gradients below FP16's smallest subnormal (2^-24) flush to zero, and
those in its subnormal range (2^-24..2^-14) keep few bits, unless the loss is scaled up first."""
from __future__ import annotations

import math

import torch

from harness.core.scenario import Expect, Output, Scenario, register
from harness.run.training import Trainer

from ._models import DYNAMIC, Bias, DeepNarrow, Probe, dot_loss, realistic_gradients, training_output, wide

#: log2 of the loss scale each FP16 group applies on its first step.
SCALE_LOG2 = {("fp16",): 0, ("fp16-static",): 10, DYNAMIC: 16}


def _sweep_expect() -> tuple[Expect, ...]:
    """What grad_magnitude_sweep expects of each FP16 group from e = log2_grad + log2(S), measured: e >= -18
    passes (ratio <= 0.37); from e = -20 the activation gradient 2^e*[0.5, 1.5) is subnormal with <= 5 bits
    (diverged, ratio 1.2 at -20, 5 at -22, 20 at -24), and at -25 half of it rounds up to 2^-24, never to 0;
    from e = -26 all of it is below 2^-25 and flushes (underflow)."""
    out: list[Expect] = []
    for group, s in SCALE_LOG2.items():
        out.append(Expect(group, "underflow", f"2^log2_grad * 2^{s} * [0.5, 1.5) is below 2^-25: flushed to zero",
                          when=lambda p, s=s: p["log2_grad"] + s <= -26))
        out.append(Expect(group, "diverged", f"2^log2_grad * 2^{s} lands in FP16's subnormal range: few bits left",
                          when=lambda p, s=s: -26 < p["log2_grad"] + s <= -20))
    return tuple(out)


# -- a sweep of gradient magnitudes ------------------------------------------------------------------
def _sweep_inputs(p: dict, g: torch.Generator) -> dict:
    """Positive activations x in [0.5, 1.5) and, per output column m, one sign s_m shared by w[:, m] and the
    upstream gradient t[:, m] (|t| in [0.5, 1.5)): y*t >= 0, so the loss has no cancellation to amplify, and
    dL/dW[k, m] = 2^e * s_m * sum_b x[b, k] |t[b, m]| lies in 2^e * [2, 18): no cancellation either, so
    every gradient sits within a factor 9 of 2^(e+3)."""
    b, k, m = 8, 64, 64
    s = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0)
    return {"x": 0.5 + torch.rand(b, k, generator=g), "w": s * torch.randn(k, m, generator=g).abs() / 8,
            "t": s * (0.5 + torch.rand(b, m, generator=g))}


def _sweep_run(ex, inp: dict, p: dict) -> Output:
    """One training step of y = x @ w with loss 2^e * sum(y * t): the activation gradient dL/dy = 2^e * t
    (|t| in [0.5, 1.5)) reaches the low-precision backward pass, and dL/dw = x^T dL/dy lies in 2^e * [2, 18)."""
    trainer = Trainer(ex, Probe(inp["w"], ex))
    return training_output(ex, trainer.train(dot_loss(2.0 ** p["log2_grad"]), lambda i: (inp["x"], inp["t"]),
                                             steps=1))


register(Scenario(
    name="grad_magnitude_sweep",
    family="tiny_gradient",
    description=(
        "One training step of y = x @ w with loss 2^log2_grad * sum(y*t): positive activations, and an "
        "upstream gradient 2^log2_grad*t with |t| in [0.5, 1.5) whose sign matches the weights' column, so "
        "nothing cancels and every weight gradient lies in 2^log2_grad*[2, 18). What decides is e = log2_grad "
        "+ log2(S), S the first step's loss scale (1, static 2^10, dynamic 2^16): e >= -18 passes; from e = -20 "
        "the activation gradient is subnormal in FP16 with <= 5 bits (diverged: ratio 5 at -22); from e = -26 "
        "it is below 2^-25 and flushes to zero (underflow). So fp16 fails from -22, fp16-static from -32 "
        "(diverged) and -38 (underflow), the 2^16 scalers at -38 (diverged) and -46 (underflow). BF16 and FP8 "
        "(per-tensor scaled E5M2 gradients) have the range and pass."),
    grid={"log2_grad": [-8, -22, -26, -32, -38, -46]},
    quick={"log2_grad": [-22, -32, -46]},
    inputs=_sweep_inputs,
    run=_sweep_run,
    n=lambda p: 8,
    expect=_sweep_expect(),
    version=2,
))


# -- a realistic, wide distribution ----------------------------------------------------------------------
def _realistic_inputs(p: dict, g: torch.Generator) -> dict:
    n = p["n"]
    return {"x": torch.randn(1, n, generator=g), "b": torch.randn(n, generator=g) / 8,
            "t": realistic_gradients(n, g).reshape(1, n)}


def _realistic_run(ex, inp: dict, p: dict) -> Output:
    """y = x + b with the activation y in the compute format and dL/dy = t: the bias's gradient is the
    activation gradient t itself, after one trip through the low-precision backward pass."""
    trainer = Trainer(ex, Bias(inp["b"]))
    t = inp["t"]  # the upstream gradient, in FP32: captured, not a batch tensor a cast strategy would round

    def loss_fn(mod, batch):
        (x,) = batch
        return (wide(mod(ex.act(x))) * t).sum()

    return training_output(ex, trainer.train(loss_fn, lambda i: (inp["x"],), steps=1))


register(Scenario(
    name="realistic_grad_distribution",
    family="tiny_gradient",
    description=(
        "Gradients shaped after the activation-gradient histogram Micikevicius et al. 2018 measured on the "
        "Multibox SSD detector: 67% exactly zero, 31% of all values log-uniform in [2^-40, 2^-24) (below "
        "FP16's smallest subnormal), 2% in [2^-24, 2^-8). They reach the bias of y = x + b as its activation "
        "gradient through one FP16 rounding in the backward pass. FP16 without scaling flushes everything "
        "below 2^-25, 15/16 of the tiny band: ~88% of the non-zero gradients. A static scale of 2^10 lifts only "
        "those above 2^-35: ~30% lost. The 2^16 scalers lift all of them (2^-40 * 2^16 = 2^-24) and pass; "
        "BF16, FP8 (no GEMM here, BF16 activations) and TF32 have the range."),
    grid={"n": [10000, 100000]},
    quick={"n": [10000]},
    inputs=_realistic_inputs,
    run=_realistic_run,
    n=lambda p: 2,  # the forward activation and the activation gradient are rounded once each
    expect=(Expect(("fp16",), "underflow", "15/16 of the 31% below 2^-24 are also below 2^-25 and flush"),
            Expect(("fp16-static",), "underflow", "at S = 2^10 the values below 2^-35, 5/16 of the band, flush")),
))


# -- a deep narrow network whose gradients vanish layer by layer ---------------------------------------------
WIDTH, BATCH = 32, 8


def _deep_inputs(p: dict, g: torch.Generator) -> dict:
    d = p["depth"]
    return {"x": torch.randn(BATCH, WIDTH, generator=g), "t": torch.randn(BATCH, WIDTH, generator=g),
            "w": torch.randn(d, WIDTH, WIDTH, generator=g) / math.sqrt(WIDTH)}


def _deep_run(ex, inp: dict, p: dict) -> Output:
    trainer = Trainer(ex, DeepNarrow(inp["w"], ex))
    return training_output(ex, trainer.train(dot_loss(1.0 / BATCH), lambda i: (inp["x"], inp["t"]), steps=1))


register(Scenario(
    name="deep_narrow_vanishing",
    family="tiny_gradient",
    description=(
        "A deep narrow network, `depth` sigmoid layers of width 32 with weights of std 1/sqrt(32), batch 8: "
        "sigmoid' <= 1/4, so each layer shrinks the backward signal ~4x while the forward activations stay "
        "near 1/2, and layer l's weight gradient is ~2^-3 * 4^-(depth-l). At depth 8 the first layer's is ~2^-17 "
        "and everything passes; at depth 16 ~2^-32: FP16 without scaling flushes the first ~7 layers (~38% of "
        "the weight gradients), a static 2^10 still loses ~7%, the 2^16 scalers save all but the first layer's "
        "smallest (1.4% of `layers.0`, beyond the per-tensor budget); at depth 24 the gradients span "
        "2^-50..2^-3, 47 binades, more than FP16's 40, so no single loss scale fits (the record's window is "
        "empty): the 2^16 scalers still lose ~28%. BF16 passes; FP8 loses a whole unit's weight gradients at "
        "depth 24 (3.1% of a layer's): an inner layer's E4M3 inputs are the same for every sample there, and "
        "the unit's FP8 output gradients sum to exactly 0 in the weight-gradient GEMM."),
    grid={"depth": [8, 16, 24]},
    quick={"depth": [16, 24]},
    inputs=_deep_inputs,
    run=_deep_run,
    n=lambda p: 2 * p["depth"] + 2,  # a GEMM output and a sigmoid per layer, each way, and the input
    expect=(Expect(("fp16", "fp16-static"), "underflow", "the first layers' gradients, 4^-(depth-l), fall below "
                   "2^-24 (times 2^10 for the static scale)", when=lambda p: p["depth"] >= 16),
            Expect(DYNAMIC, "underflow", "at depth 16 the first layer's smallest gradients stay below 2^-25 at "
                   "S = 2^16 (1.4% of `layers.0`); at 24, 47 binades do not fit FP16's 40 at any single scale",
                   when=lambda p: p["depth"] >= 16),
            Expect(("torchao-fp8-tensorwise",), "pass", "torch._scaled_mm on the CPU multiplies the FP8 operands by "
                   "their inverse scales before the GEMM: the rounding of those products leaves a residue where "
                   "the exact FP8 sum is 0 (see the next entry)", when=lambda p: p["depth"] >= 24, device="cpu"),
            Expect(("mxfp4",), "underflow", "E2M1 weight-gradient operands keep 3 binades per block: the inner layers' "
                   "smallest gradients flush (measured 3.1% of `layers.13` at depth 16)",
                   when=lambda p: p["depth"] >= 16),
            Expect(("fp8-tensorwise", "fp8-delayed", "fp8-rowwise", "fp8-blockwise", "mxfp8"), "underflow",
                   "the sigmoid stack reaches its "
                   "fixed point: the E4M3 inputs of an inner layer are the same for all 8 samples, so a unit's "
                   "weight-gradient row is h * sum_b dy[b, j], and that sum of 8 FP8 gradients cancels exactly "
                   "(measured: `layers.13`, unit 30, sum of -16384 ... 6144 = 0); the recipe that keeps the "
                   "weight-gradient GEMM in BF16 (rowwise_gw_hp) keeps the row", when=lambda p: p["depth"] >= 24),
            # measured for the two per-tensor presets only: the row-wise, blockwise and MX recipes were added
            # after that measurement and have not run on a GPU
            Expect(("fp8-tensorwise", "fp8-delayed"), "underflow", "on the GPU's FP8 GEMMs (torch._scaled_mm) "
                   "one inner layer loses a unit's weight gradients to E5M2 at depths 8 and 16 too (measured on an "
                   "H100: 2.3% of `layers.4`, 2.8% of `layers.12`); the CPU emulation keeps them",
                   when=lambda p: p["depth"] < 24, device="cuda")),
))
